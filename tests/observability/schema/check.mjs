// Type-checks Grafana dashboard JSON files against @grafana/schema.
//
// The package ships its dashboard schema as TypeScript types only (no JSON schema, no CUE),
// so each dashboard becomes a TypeScript module in memory that the compiler checks:
// - the whole document against `Dashboard`;
// - each panel against `Panel`, or `RowPanel`;
// - each panel's `options` and `fieldConfig.defaults.custom` against its plugin's generated
//   `Options` and `FieldConfig` (the dashboard types take any object there).
// `Json<T>` is T as it travels in JSON: a string enum becomes the union of its values.
// Object literals get excess-property checks, so an unknown or misspelled key fails as
// surely as a wrong type. A panel type with no schema here is an error, not a pass.
//
// Usage: node check.mjs DASHBOARD.json...   Exit 0 when all pass; 1 with one line per error.

import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import ts from "typescript";

const here = path.dirname(fileURLToPath(import.meta.url));
const composable = "@grafana/schema/dist/esm/raw/composable";

// Panel plugin id -> [its generated types' module, its alias here, has a FieldConfig type].
const PANELS = {
  timeseries: ["timeseries/panelcfg/x/TimeSeriesPanelCfg_types.gen.js", "timeseries", true],
  stat: ["stat/panelcfg/x/StatPanelCfg_types.gen.js", "stat", false],
  "state-timeline": [
    "statetimeline/panelcfg/x/StateTimelinePanelCfg_types.gen.js",
    "statetimeline",
    true,
  ],
  bargauge: ["bargauge/panelcfg/x/BarGaugePanelCfg_types.gen.js", "bargauge", false],
  table: ["table/panelcfg/x/TablePanelCfg_types.gen.js", "table", true],
  text: ["text/panelcfg/x/TextPanelCfg_types.gen.js", "text", false],
};

const JSON_TYPE = `type Json<T> = T extends string
  ? \`\${T}\`
  : T extends readonly (infer U)[]
    ? Json<U>[]
    : T extends object
      ? { [K in keyof T]: Json<T[K]> }
      : T;`;

function moduleFor(dashboard, problems) {
  const lines = [`import type { Dashboard, Panel, RowPanel } from "@grafana/schema";`];
  for (const [file, alias] of Object.values(PANELS)) {
    lines.push(`import type * as ${alias} from "${composable}/${file}";`);
  }
  lines.push(JSON_TYPE);
  const literal = (value) => JSON.stringify(value, null, 2);
  lines.push(`export const dashboard = ${literal(dashboard)} satisfies Json<Dashboard>;`);
  const panels = (dashboard.panels ?? []).flatMap((p) => [p, ...(p.panels ?? [])]);
  panels.forEach((panel, i) => {
    if (panel.type === "row") {
      lines.push(`export const panel${i} = ${literal(panel)} satisfies Json<RowPanel>;`);
      return;
    }
    if (!(panel.type in PANELS)) {
      problems.push(`panel ${JSON.stringify(panel.title)}: no schema for type ${panel.type}`);
      return;
    }
    const [, alias, hasFieldConfig] = PANELS[panel.type];
    lines.push(`export const panel${i} = ${literal(panel)} satisfies Json<Panel>;`);
    const options = panel.options ?? {};
    lines.push(`export const options${i} = ${literal(options)} satisfies Json<${alias}.Options>;`);
    const custom = panel.fieldConfig?.defaults?.custom;
    if (custom !== undefined) {
      const type = hasFieldConfig ? `Json<${alias}.FieldConfig>` : "Record<string, never>";
      lines.push(`export const custom${i} = ${literal(custom)} satisfies ${type};`);
    }
  });
  return lines.join("\n") + "\n";
}

const files = process.argv.slice(2);
if (files.length === 0) {
  console.error("usage: node check.mjs DASHBOARD.json...");
  process.exit(2);
}
const problems = [];
const sources = new Map(); // virtual .mts path -> [dashboard file, source text]
files.forEach((file, i) => {
  let dashboard;
  try {
    dashboard = JSON.parse(fs.readFileSync(file, "utf8"));
  } catch (e) {
    problems.push(`${file}: not JSON: ${e.message}`);
    return;
  }
  const own = [];
  const text = moduleFor(dashboard, own);
  problems.push(...own.map((p) => `${file}: ${p}`));
  sources.set(path.join(here, `dashboard${i}.mts`), [file, text]);
});

const options = {
  strict: true,
  noEmit: true,
  target: ts.ScriptTarget.ES2022,
  module: ts.ModuleKind.NodeNext,
  moduleResolution: ts.ModuleResolutionKind.NodeNext,
  skipLibCheck: true,
  types: [],
};
const host = ts.createCompilerHost(options);
const { getSourceFile, fileExists, readFile } = host;
host.fileExists = (name) => sources.has(name) || fileExists.call(host, name);
host.readFile = (name) => (sources.has(name) ? sources.get(name)[1] : readFile.call(host, name));
host.getSourceFile = (name, version, ...rest) =>
  sources.has(name)
    ? ts.createSourceFile(name, sources.get(name)[1], version)
    : getSourceFile.call(host, name, version, ...rest);

const program = ts.createProgram([...sources.keys()], options, host);
for (const d of ts.getPreEmitDiagnostics(program)) {
  const message = ts.flattenDiagnosticMessageText(d.messageText, " ");
  if (!d.file || !sources.has(d.file.fileName)) {
    problems.push(`typescript: ${message}`);
    continue;
  }
  const [file, text] = sources.get(d.file.fileName);
  const { line } = d.file.getLineAndCharacterOfPosition(d.start ?? 0);
  const at = text.split("\n")[line].trim();
  problems.push(`${file}: ${message} (at \`${at}\`)`);
}
for (const p of problems) console.log(p);
process.exit(problems.length ? 1 : 0);
