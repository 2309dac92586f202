// Drives Debian's chromium (headless, through playwright-core) through the shipped chat
// page, one step per command-line option, in order. Used by tests/clients.rs.
//
//   node tests/browser/chat.mjs --goto URL [steps...]
//
// Steps:
//   --goto URL              open URL (self-signed certificates are accepted)
//   --fill SELECTOR VALUE   type VALUE into the field
//   --fill-env SELECTOR VAR type the value of environment variable VAR (keeps secrets off argv)
//   --click SELECTOR        click
//   --wait-status TEXT      wait until the status pill's text contains TEXT
//   --wait-state STATE      wait until the status pill's state is STATE (connecting,
//                           connected, reconnecting, closed)
//   --send TEXT             type TEXT into the message box and press Send
//   --wait-log TEXT         wait until some log entry's text contains TEXT
//   --wait-member UID       wait until UID is in the member list
//   --wait-no-member UID    wait until UID is not in the member list
//   --screenshot PATH       save a PNG of the page
//   --print                 print the status, the member list, the footer's websocat command
//                           and every log entry as JSON lines on stdout:
//                           {"status": "...", "state": "...", "members": [...], "command": "..."}
//                           then {"kind": "...", "text": "..."} per entry
//
// Every wait is bounded (STEP_TIMEOUT_MS); the whole run is bounded (TOTAL_TIMEOUT_MS).
// Exit 0 when every step passed; otherwise 1, with the reason and the page's log on stderr, and a
// screenshot beside the --screenshot path with the suffix -failure.png.
//
// Environment: CHROMIUM (default /usr/bin/chromium).

import { chromium } from "playwright-core";
import { mkdtempSync, mkdirSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";

const STEP_TIMEOUT_MS = 20_000;
const TOTAL_TIMEOUT_MS = 90_000;

function parseSteps(argv) {
  const arity = {
    "--goto": 1, "--fill": 2, "--fill-env": 2, "--click": 1, "--wait-status": 1,
    "--wait-state": 1,
    "--send": 1, "--wait-log": 1, "--wait-member": 1, "--wait-no-member": 1,
    "--screenshot": 1, "--print": 0,
  };
  const steps = [];
  for (let i = 0; i < argv.length; ) {
    const name = argv[i];
    if (!(name in arity)) throw new Error(`unknown step ${name}`);
    const args = argv.slice(i + 1, i + 1 + arity[name]);
    if (args.length !== arity[name]) throw new Error(`${name} needs ${arity[name]} argument(s)`);
    steps.push({ name, args });
    i += 1 + arity[name];
  }
  return steps;
}

async function pageState(page) {
  return page.evaluate(() => ({
    status: document.getElementById("status").textContent,
    state: document.getElementById("status").dataset.state,
    members: [...document.querySelectorAll("#member-list li")].map((li) => li.textContent),
    command: document.getElementById("ws-command").textContent,
    log: [...document.querySelectorAll("#log li")].map((li) => ({
      kind: li.dataset.kind,
      text: li.textContent,
    })),
  }));
}

async function run(steps) {
  const executablePath = process.env.CHROMIUM || "/usr/bin/chromium";
  const profile = mkdtempSync(join(tmpdir(), "mles-chromium-"));
  // A fresh profile each run; playwright wants it as launchPersistentContext's first argument.
  const context = await chromium.launchPersistentContext(profile, {
    executablePath,
    headless: true,
    timeout: STEP_TIMEOUT_MS,
    ignoreHTTPSErrors: true,
    viewport: { width: 900, height: 640 },
    args: [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
  });
  let page;
  const shot = steps.find((s) => s.name === "--screenshot");
  const failureShot = shot ? shot.args[0].replace(/\.png$/, "") + "-failure.png" : null;
  try {
    page = context.pages()[0] ?? (await context.newPage());
    page.setDefaultTimeout(STEP_TIMEOUT_MS);
    page.on("console", (msg) => console.error(`[page ${msg.type()}] ${msg.text()}`));
    page.on("pageerror", (err) => console.error(`[page error] ${err.message}`));
    for (const { name, args } of steps) {
      console.error(`step ${name} ${name === "--fill-env" ? args[0] : args.join(" ")}`);
      switch (name) {
        case "--goto": {
          const response = await page.goto(args[0], { waitUntil: "load" });
          if (!response || !response.ok()) {
            throw new Error(`GET ${args[0]}: ${response ? response.status() : "no response"}`);
          }
          break;
        }
        case "--fill":
          await page.fill(args[0], args[1]);
          break;
        case "--fill-env": {
          const value = process.env[args[1]];
          if (value === undefined) throw new Error(`environment variable ${args[1]} is not set`);
          await page.fill(args[0], value);
          break;
        }
        case "--click":
          await page.click(args[0]);
          break;
        case "--wait-status":
          await page.waitForFunction(
            (want) => document.getElementById("status").textContent.includes(want),
            args[0],
            { timeout: STEP_TIMEOUT_MS, polling: 50 },
          );
          break;
        case "--wait-state":
          await page.waitForFunction(
            (want) => document.getElementById("status").dataset.state === want,
            args[0],
            { timeout: STEP_TIMEOUT_MS, polling: 50 },
          );
          break;
        case "--send":
          await page.fill("#message", args[0]);
          await page.click("#send");
          break;
        case "--wait-log":
          await page.waitForFunction(
            (want) =>
              [...document.querySelectorAll("#log li")].some((li) => li.textContent.includes(want)),
            args[0],
            { timeout: STEP_TIMEOUT_MS, polling: 50 },
          );
          break;
        case "--wait-member":
        case "--wait-no-member":
          await page.waitForFunction(
            ([want, present]) =>
              [...document.querySelectorAll("#member-list li")].some(
                (li) => li.dataset.uid === want,
              ) === present,
            [args[0], name === "--wait-member"],
            { timeout: STEP_TIMEOUT_MS, polling: 50 },
          );
          break;
        case "--screenshot":
          mkdirSync(dirname(args[0]), { recursive: true });
          await page.screenshot({ path: args[0], fullPage: true });
          break;
        case "--print": {
          const state = await pageState(page);
          console.log(JSON.stringify({
            status: state.status,
            state: state.state,
            members: state.members,
            command: state.command,
          }));
          for (const entry of state.log) console.log(JSON.stringify(entry));
          break;
        }
      }
    }
  } catch (err) {
    if (page) {
      try {
        const state = await pageState(page);
        console.error(`page status: ${state.status}`);
        console.error(`page members: ${state.members.join(", ")}`);
        for (const entry of state.log) console.error(`page log: [${entry.kind}] ${entry.text}`);
        if (failureShot) {
          mkdirSync(dirname(failureShot), { recursive: true });
          await page.screenshot({ path: failureShot, fullPage: true });
          console.error(`failure screenshot: ${failureShot}`);
        }
      } catch (_) {
        // The page itself is gone; the original error says why.
      }
    }
    throw err;
  } finally {
    await context.close().catch(() => {});
    rmSync(profile, { recursive: true, force: true });
  }
}

const overall = setTimeout(() => {
  console.error(`chat.mjs: gave up after ${TOTAL_TIMEOUT_MS} ms`);
  process.exit(3);
}, TOTAL_TIMEOUT_MS);

try {
  await run(parseSteps(process.argv.slice(2)));
  clearTimeout(overall);
  process.exit(0);
} catch (err) {
  console.error(`chat.mjs: ${err.message}`);
  process.exit(1);
}
