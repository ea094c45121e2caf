// Copies the centrifuge-js browser bundle from the pinned npm package into vendor/, where the
// gateway embeds it (src/demo.rs), so the page needs no CDN and no build step:
//
//   npm ci && npm run vendor          (run again after changing the pinned version)
//   node vendor.mjs --check           exit status 1 when vendor/ differs from node_modules
//
// The bundle is copied byte for byte except its last `//# sourceMappingURL=` line (the map is
// not served). vendor/VERSION records the package version.
import { readFileSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const pkgDir = join(here, 'node_modules', 'centrifuge');
const pkg = JSON.parse(readFileSync(join(pkgDir, 'package.json'), 'utf8'));
const bundle = readFileSync(join(pkgDir, 'dist', 'centrifuge.js'), 'utf8').replace(
  /\n\/\/# sourceMappingURL=[^\n]*\n?$/,
  '\n',
);
const files = {
  'centrifuge.js': bundle,
  'centrifuge.LICENSE': readFileSync(join(pkgDir, 'LICENSE'), 'utf8'),
  VERSION: `centrifuge ${pkg.version}\n`,
};

const check = process.argv.includes('--check');
let stale = [];
for (const [name, text] of Object.entries(files)) {
  const path = join(here, 'vendor', name);
  if (check) {
    let have = null;
    try {
      have = readFileSync(path, 'utf8');
    } catch {}
    if (have !== text) stale.push(name);
  } else {
    writeFileSync(path, text);
  }
}
if (stale.length) {
  console.error(`vendor/ is stale (${stale.join(', ')}): run npm run vendor`);
  process.exit(1);
}
console.log(check ? `vendor/ matches centrifuge ${pkg.version}` : `vendored centrifuge ${pkg.version}`);
