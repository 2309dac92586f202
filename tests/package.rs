//! The Debian package, as an operator gets it: `cargo deb` builds it, `apt-get install
//! ./target/debian/<file>.deb` installs it, the installed unit passes `systemd-analyze
//! verify`, the installed `/usr/bin/mles --version` runs and serves the installed site,
//! nothing was enabled or started, and `apt-get purge` takes it all away again. Every step
//! fails the test if it fails.
//!
//! This test changes the machine: it needs root and `cargo-deb` (`cargo install --locked
//! cargo-deb`), and it refuses to run where a package called `mles` is already installed,
//! so that it never purges someone's real installation. It is the only test that touches
//! the system's package state; nothing else depends on the package being installed.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BINARY: &str = "/usr/bin/mles";
const UNIT: &str = "/usr/lib/systemd/system/mles.service";
const ENV_FILE: &str = "/etc/mles/mles.env";
const SITE: &str = "/usr/share/mles/static/localhost/index.html";

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `cmd`, failing the test with its output unless it succeeds.
fn run(what: &str, cmd: &mut Command) -> Output {
    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run {cmd:?}: {e}"));
    assert!(
        output.status.success(),
        "{what} failed ({}):\n--- stdout\n{}--- stderr\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// `apt-get ARGS` as CI runs it: non-interactive, waiting (bounded) for the dpkg lock
/// if another apt is busy.
fn apt_get(args: &[&str]) -> Command {
    let mut cmd = Command::new("apt-get");
    cmd.args(["-o", "DPkg::Lock::Timeout=300", "-y"])
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive");
    cmd
}

/// Whether dpkg has anything of the package `mles`: installed, half-installed, or its
/// configuration files left after a remove. ("want flag status"; unknown packages make
/// dpkg-query fail, forgotten ones say "not-installed".)
fn mles_is_installed() -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", "mles"])
        .output()
        .is_ok_and(|o| {
            o.status.success()
                && stdout(&o)
                    .split_whitespace()
                    .nth(2)
                    .is_some_and(|status| status != "not-installed")
        })
}

/// Purges the package if the test ends half way, so a failed run leaves no package
/// behind.
struct PurgeOnDrop {
    armed: bool,
}

impl Drop for PurgeOnDrop {
    fn drop(&mut self) {
        if self.armed {
            let _ = apt_get(&["purge", "mles"]).output();
        }
    }
}

/// `cargo deb`; returns the path of the package it made.
fn build_package() -> PathBuf {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.arg("deb").current_dir(manifest_dir());
    // Without the variables cargo sets for this test process: build scripts that watch
    // them (ring's watches CARGO_MANIFEST_DIR) would otherwise see a change and rebuild
    // the release binary every time `cargo deb` alternates between here and a shell.
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        let set_by_cargo_for_tests = name == "OUT_DIR"
            || name == "CARGO_CRATE_NAME"
            || name == "CARGO_PRIMARY_PACKAGE"
            || name == "CARGO_TARGET_TMPDIR"
            || name.starts_with("CARGO_MANIFEST_")
            || name.starts_with("CARGO_PKG_")
            || name.starts_with("CARGO_BIN_");
        if set_by_cargo_for_tests {
            cmd.env_remove(&*name);
        }
    }
    let output = run(
        "cargo deb (install cargo-deb with `cargo install --locked cargo-deb`)",
        &mut cmd,
    );
    let text = stdout(&output);
    let deb = text
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.ends_with(".deb"))
        .unwrap_or_else(|| panic!("cargo deb printed no package path:\n{text}"));
    let deb = PathBuf::from(deb);
    assert!(
        deb.starts_with(manifest_dir().join("target/debian")),
        "{}",
        deb.display()
    );
    assert!(deb.is_file(), "{} missing", deb.display());
    deb
}

/// What the package holds, before it is installed: the files with their modes, and the
/// settings file as a conffile.
fn check_contents(deb: &Path) {
    let listing = stdout(&run(
        "dpkg-deb -c",
        Command::new("dpkg-deb").arg("-c").arg(deb),
    ));
    let mode_of = |path: &str| {
        listing
            .lines()
            .find(|l| l.ends_with(&format!(".{path}")))
            .and_then(|l| l.split_whitespace().next())
            .unwrap_or_else(|| panic!("{path} is not in the package:\n{listing}"))
            .to_string()
    };
    assert_eq!(mode_of(BINARY), "-rwxr-xr-x");
    assert_eq!(mode_of(UNIT), "-rw-r--r--");
    assert_eq!(mode_of(ENV_FILE), "-rw-------");
    assert_eq!(mode_of(SITE), "-rw-r--r--");
    let conffiles = stdout(&run(
        "dpkg-deb -I conffiles",
        Command::new("dpkg-deb").arg("-I").arg(deb).arg("conffiles"),
    ));
    assert_eq!(conffiles.trim(), ENV_FILE);
}

/// The installed binary serves the installed site on a loopback port.
async fn installed_binary_serves_the_installed_site() {
    let port = common::free_port();
    let _server = common::Process(
        Command::new(BINARY)
            .args(["--tls", "off", "--bind", "127.0.0.1", "--port"])
            .arg(port.to_string())
            .args(["--wwwroot", "/usr/share/mles/static"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("the installed mles starts"),
    );
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = tokio::time::Instant::now() + common::WAIT;
    let mut tcp = loop {
        match tokio::net::TcpStream::connect(addr).await {
            Ok(tcp) => break tcp,
            Err(e) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the installed mles did not listen: {e}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let req = format!("GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut raw = String::new();
    tokio::time::timeout(common::WAIT, tcp.read_to_string(&mut raw))
        .await
        .expect("answer in time")
        .unwrap();
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw:.300}");
    assert!(raw.contains("<title>mles chat</title>"), "{raw:.300}");
}

#[tokio::test]
async fn the_debian_package_installs_verifies_runs_and_purges_cleanly() {
    assert!(
        !mles_is_installed(),
        "a package called mles is already installed here; this test installs and purges \
         it, so it does not run on this machine"
    );
    let deb = build_package();
    check_contents(&deb);

    // Installed as the README says, with apt-get from the file (apt wants "./" or a path).
    let mut guard = PurgeOnDrop { armed: true };
    let install = run("apt-get install", apt_get(&["install"]).arg(&deb));
    assert!(mles_is_installed());
    // First install: the operator is told what to do next, and nothing was enabled.
    assert!(
        stdout(&install).contains("sudo systemctl enable --now mles"),
        "{}",
        stdout(&install)
    );
    assert!(
        !Path::new("/etc/systemd/system/multi-user.target.wants/mles.service").exists(),
        "a fresh install must not enable the service"
    );
    for path in [BINARY, UNIT, ENV_FILE, SITE] {
        assert!(Path::new(path).is_file(), "{path} not installed");
    }
    {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let env = std::fs::metadata(ENV_FILE).unwrap();
        assert_eq!(env.permissions().mode() & 0o777, 0o600, "{ENV_FILE} mode");
        assert_eq!((env.uid(), env.gid()), (0, 0), "{ENV_FILE} owner");
    }

    // The installed unit, as systemd reads it, names the installed binary and site.
    let verify = run(
        "systemd-analyze verify",
        Command::new("systemd-analyze")
            .args(["verify", "--man=no", UNIT])
            .env("SYSTEMD_LOG_LEVEL", "notice")
            .env("SYSTEMD_PAGER", "")
            .env("SYSTEMD_COLORS", "0"),
    );
    let complaints = format!(
        "{}{}",
        stdout(&verify),
        String::from_utf8_lossy(&verify.stderr)
    );
    assert!(
        !complaints.contains("mles.service") && !complaints.contains(BINARY),
        "systemd-analyze verify warned about the installed unit:\n{complaints}"
    );
    let unit = std::fs::read_to_string(UNIT).unwrap();
    assert!(unit.contains("\nExecStart=/usr/bin/mles "), "{unit}");
    assert!(
        unit.contains("\nEnvironment=MLES_WWWROOT=/usr/share/mles/static\n"),
        "{unit}"
    );

    let version = run("mles --version", Command::new(BINARY).arg("--version"));
    assert_eq!(
        stdout(&version),
        format!("mles {}\n", mles::version::LONG),
        "the installed binary is this build"
    );
    installed_binary_serves_the_installed_site().await;

    // Purged: binary, unit, settings and site are gone, and dpkg forgot the package.
    run("apt-get purge", &mut apt_get(&["purge", "mles"]));
    guard.armed = false;
    assert!(!mles_is_installed(), "dpkg still lists mles after purge");
    for path in [BINARY, UNIT, ENV_FILE, SITE, "/etc/mles", "/usr/share/mles"] {
        assert!(
            !Path::new(path).exists(),
            "{path} is still there after purge"
        );
    }
}
