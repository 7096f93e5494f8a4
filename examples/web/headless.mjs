// Drive the example page in headless Chromium (puppeteer-core, which downloads no browser: pass one).
//
//   node headless.mjs REQUESTS.json
//
// REQUESTS.json: {"url": "http://127.0.0.1:PORT/", "chromium": "/usr/bin/chromium", "timeout_ms": 600000,
//                 "args": [extra Chromium flags], "requests": [{"model", "image": PATH, "prompt",
//                 "maxNewTokens", "dtype", "stopAtEos"}, ...]}
// serve.py must be serving the page at `url` with the models. Each image file is handed to the page
// as a data: URL. Prints one JSON line: {"environment": pgexportEnvironment(), "results": [...]}
// (each result is pgexportGenerate's, or {"error": "..."}), and the page's console on stderr.

import fs from 'node:fs';
import path from 'node:path';

import puppeteer from 'puppeteer-core';

const MIME = { '.png': 'image/png', '.jpg': 'image/jpeg', '.jpeg': 'image/jpeg', '.webp': 'image/webp' };

function dataUrl(file) {
    const type = MIME[path.extname(file).toLowerCase()] ?? 'application/octet-stream';
    return `data:${type};base64,${fs.readFileSync(file).toString('base64')}`;
}

const spec = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
const timeout = spec.timeout_ms ?? 600000;
const browser = await puppeteer.launch({
    executablePath: spec.chromium,
    headless: true,
    protocolTimeout: timeout,
    // --no-sandbox: Chromium refuses its sandbox as root (containers, CI).
    args: ['--no-sandbox', '--disable-dev-shm-usage', '--no-first-run', '--no-default-browser-check', ...(spec.args ?? [])],
});
try {
    const page = await browser.newPage();
    page.setDefaultTimeout(timeout);
    page.on('console', (message) => process.stderr.write(`[page ${message.type()}] ${message.text()}\n`));
    page.on('pageerror', (error) => process.stderr.write(`[page error] ${error}\n`));
    page.on('requestfailed', (request) => process.stderr.write(`[request failed] ${request.url()} ${request.failure()?.errorText}\n`));
    await page.goto(spec.url, { waitUntil: 'load' });
    await page.waitForFunction(() => window.pgexportReady === true);
    const environment = await page.evaluate(() => window.pgexportEnvironment());
    const results = [];
    for (const { image, ...request } of spec.requests ?? []) {
        const imageUrl = dataUrl(image);
        results.push(
            await page.evaluate(async (args) => {
                try {
                    return await window.pgexportGenerate(args);
                } catch (error) {
                    return { error: `${error}\n${error?.stack ?? ''}` };
                }
            }, { ...request, imageUrl }),
        );
    }
    process.stdout.write(JSON.stringify({ environment, browser_version: await browser.version(), results }) + '\n');
} finally {
    await browser.close();
}
