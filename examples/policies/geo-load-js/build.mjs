// Builds geo-load-js.wasm with ComponentizeJS (npm install first): node build.mjs [OUT]
import { componentize } from "@bytecodealliance/componentize-js";
import { readFile, writeFile } from "node:fs/promises";
import { fileURLToPath } from "node:url";
import { dirname, join } from "node:path";

const here = dirname(fileURLToPath(import.meta.url));
const out = process.argv[2] ?? join(here, "geo-load-js.wasm");
const { component } = await componentize({
  sourcePath: join(here, "app.js"),
  witPath: join(here, "../../../wit/policy.wit"),
  worldName: "policy",
  // The policy needs no HTTP and no fetch; the rest of WASI it imports is granted nothing.
  disableFeatures: ["http", "fetch-event"],
});
await writeFile(out, component);
console.log(out);
