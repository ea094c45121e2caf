// Drives the live-table demo page in Debian's Chromium with playwright-core (used by
// tests/browser.rs). The browser is never downloaded: CHROMIUM (default /usr/bin/chromium).
//
//   node live_table.mjs
//
// stdin, one JSON command per line; stdout, one JSON answer per line, in order:
//   {"cmd":"open","url":"http://…/demo/"}         → {"ok":true}            page loaded, connected
//   {"cmd":"insert","label":"a","count":200}       → {"ok":true,"status":"inserted 200"}
//                                                    (fills the page's form and clicks Insert)
//   {"cmd":"wait","expr":"…","timeout_ms":30000}  → {"ok":true}            a JS expression over
//                                                    the page (e.g. liveTable.stats().rows >= 200)
//   {"cmd":"click","id":7,"button":"+1"}          → {"ok":true}            a row's +1 or ✕ button
//   {"cmd":"read"}                                 → {"ok":true,"shown":{…},"rows":[…],"stats":{…}}
//                                                    what the page shows: status fields, rows
//                                                    ({id,label,value,version}, top to bottom)
//   {"cmd":"screenshot","path":"…png"}            → {"ok":true}
//   {"cmd":"close"}                                → {"ok":true}, then exit 0
// A failed command answers {"ok":false,"error":"…","stats":{…}}. Page console messages and
// errors go to stderr, for the test's failure message.
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { chromium } from 'playwright-core';

const FLAGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-background-networking',
  '--disable-quic',
  '--no-first-run',
  '--disable-component-update',
  '--disable-sync',
];

const profile = mkdtempSync(join(tmpdir(), 'pgfanout-chromium-'));
const context = await chromium.launchPersistentContext(profile, {
  executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
  headless: true,
  args: FLAGS,
  viewport: { width: 1280, height: 860 },
});
const page = context.pages()[0] ?? (await context.newPage());
page.on('console', (m) => console.error(`page console.${m.type()}: ${m.text()}`));
page.on('pageerror', (e) => console.error(`page error: ${e.message}`));

async function stats() {
  try {
    return await page.evaluate(() => (window.liveTable ? window.liveTable.stats() : null));
  } catch {
    return null;
  }
}

async function read() {
  return page.evaluate(() => {
    const text = (id) => document.getElementById(id).textContent;
    return {
      shown: {
        state: text('state'),
        node: text('node'),
        channel: text('channel'),
        offset: text('offset'),
        publications: text('publications'),
        recovered: text('recovered'),
        rows: text('row-count'),
      },
      rows: [...document.querySelectorAll('#rows tr[data-id]')].map((tr) => {
        const cells = [...tr.children].map((td) => td.textContent);
        return { id: Number(tr.dataset.id), label: cells[1], value: Number(cells[2]), version: Number(cells[3]) };
      }),
      stats: window.liveTable.stats(),
    };
  });
}

const commands = {
  async open({ url }) {
    await page.goto(url, { waitUntil: 'load' });
    await page.waitForFunction(
      () => window.liveTable && window.liveTable.stats().state === 'connected' && !window.liveTable.stats().loading,
      null,
      { timeout: 30000 },
    );
    return {};
  },
  async insert({ label, count }) {
    await page.fill('#label', label);
    await page.fill('#count', String(count));
    await page.click('#insert');
    await page.waitForFunction(
      () => /^(inserted|failed)/.test(document.getElementById('form-status').textContent),
      null,
      { timeout: 30000 },
    );
    const status = await page.textContent('#form-status');
    if (!status.startsWith('inserted')) throw new Error(`the form says: ${status}`);
    return { status };
  },
  async wait({ expr, timeout_ms }) {
    await page.waitForFunction(expr, null, { timeout: timeout_ms ?? 30000, polling: 50 });
    return {};
  },
  async click({ id, button }) {
    await page.click(`#rows tr[data-id="${Number(id)}"] button:text-is("${button}")`);
    return {};
  },
  read,
  async screenshot({ path }) {
    await page.mouse.move(0, 0);
    await page.evaluate(() => {
      document.activeElement?.blur();
      window.scrollTo(0, 0);
    });
    await page.screenshot({ path });
    return {};
  },
  async close() {
    return {};
  },
};

const lines = createInterface({ input: process.stdin });
for await (const line of lines) {
  if (!line.trim()) continue;
  let command;
  let answer;
  try {
    command = JSON.parse(line);
    const run = commands[command.cmd];
    if (!run) throw new Error(`unknown command ${command.cmd}`);
    answer = { ok: true, ...(await run(command)) };
  } catch (err) {
    answer = { ok: false, error: String(err && err.message ? err.message : err), stats: await stats() };
  }
  process.stdout.write(JSON.stringify(answer) + '\n');
  if (command && command.cmd === 'close') break;
}
await context.close();
rmSync(profile, { recursive: true, force: true });
// stdin may still hold the event loop open.
process.exit(0);
