// SPM for ComfyUI: shows on every SPM Load Membrane node what its membrane erases and, after sampling,
// how far each membrane opened (its Facilitated Transport gates on the positive and negative rows).
//
// Sources: before a run, the selected file name; after a run, the node's ui payload
// `spm_membrane` (nodes/load.py); after sampling, the websocket event `spm.gates`
// (nodes/runtime.py), routed to the SPM Load Membrane node whose id it names.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const EXTENSION = "comfyui_spm.membrane_info";
const LOADER = "SPMLoader";
const TRAINER = "SPMTrain";
const WIDGET = "spm_info";
const FONT = "12px Arial, sans-serif";
const LINE_HEIGHT = 16;
const MARGIN = 15;
const measure = document.createElement("canvas").getContext("2d");

// --- what to show --------------------------------------------------------------------------

function selectedFile(node) {
  return node.widgets?.find((w) => w.name === "membrane")?.value ?? "";
}

function conceptsFromFileName(file) {
  const stem = String(file).split(/[\\/]/).pop().replace(/\.safetensors$/i, "");
  return stem ? [stem.replace(/_+/g, " ")] : [];
}

function verb(concepts) {
  const edits = concepts.filter((c) => String(c).includes("→")).length;
  return edits === 0 ? "erases" : edits === concepts.length ? "edits" : "erases / edits";
}

const fixed = (x) => (typeof x === "number" && Number.isFinite(x) ? x.toFixed(2) : "–");

// The node's text, one entry per paragraph. What a run reported is shown only while the same
// file is still selected; otherwise the label falls back to the file name.
function describe(node) {
  const file = selectedFile(node);
  if (!file) return [];
  const run = node.spm?.run?.file === file ? node.spm.run : null; // the ui payload (not sent when cached)
  const gates = node.spm?.gates?.file === file ? node.spm.gates : null; // the spm.gates event (sent by every sampling)
  const concepts = run?.concepts ?? gates?.concepts;
  const lines = concepts
    ? [`${verb(concepts)}: ${concepts.join(", ") || "(no concepts)"}`]
    : [`${verb(conceptsFromFileName(file))}: ${conceptsFromFileName(file).join(", ")} (from the file name)`];
  const details = run ?? (gates?.rank ? gates : null); // a cached Load SPM sends no ui payload: the gates event tells
  if (details) lines.push(`rank ${details.rank} · ${details.layers} layers · transport: ${details.transport}`);
  if (gates) lines.push(`gate last step: positive ${fixed(gates.positive)} · negative ${fixed(gates.negative)}`);
  return lines;
}

function refresh(node) {
  const widget = node.widgets?.find((w) => w.name === WIDGET);
  if (!widget) return;
  widget.value = describe(node).join("\n");
  node.setDirtyCanvas?.(true, true);
}

// --- drawing: a read-only, never serialised canvas widget ------------------------------------

// Word-wraps each paragraph of `text` to `width` pixels: [[line, ...], ...].
function wrap(text, width) {
  measure.font = FONT;
  return String(text).split("\n").map((paragraph) => {
    const lines = [];
    let line = "";
    for (const word of paragraph.split(" ")) {
      const next = line ? `${line} ${word}` : word;
      if (line && measure.measureText(next).width > width) {
        lines.push(line);
        line = word;
      } else {
        line = next;
      }
    }
    return [...lines, line];
  });
}

function infoWidget(node) {
  return {
    name: WIDGET,
    type: "spm_info",
    value: "",
    serialize: false, // not in widgets_values
    options: { serialize: false }, // not in the API prompt
    tooltip: "What this membrane erases and how far it opened in the last sampling step",
    computeSize(width) {
      const lines = this.value ? wrap(this.value, (width ?? node.size[0]) - 2 * MARGIN).flat().length : 0;
      return [width ?? node.size[0], lines * LINE_HEIGHT + 6];
    },
    draw(ctx, _node, width, y) {
      if (!this.value) return;
      ctx.save();
      ctx.font = FONT;
      ctx.textAlign = "left";
      ctx.textBaseline = "top";
      const colors = globalThis.LiteGraph ?? {};
      let row = 0;
      wrap(this.value, width - 2 * MARGIN).forEach((lines, paragraph) => {
        // the concepts stand out; details and gates are secondary
        ctx.fillStyle = paragraph === 0 ? colors.WIDGET_TEXT_COLOR ?? "#ddd" : colors.WIDGET_SECONDARY_TEXT_COLOR ?? "#999";
        for (const line of lines) ctx.fillText(line, MARGIN, y + 3 + LINE_HEIGHT * row++);
      });
      ctx.restore();
    },
  };
}

// --- wiring ----------------------------------------------------------------------------------

function findLoader(id) {
  // Execution ids look like "7" or, inside subgraphs, "12:7".
  let graph = app.graph;
  let node = null;
  for (const part of String(id ?? "").split(":")) {
    node = graph?.getNodeById?.(part) ?? null;
    graph = node?.subgraph;
  }
  return node && (node.comfyClass ?? node.type) === LOADER ? node : null;
}

function onGates(event) {
  for (const row of event?.detail?.membranes ?? []) {
    const node = findLoader(row?.node);
    if (!node) continue;
    const concepts = Array.isArray(row.concepts) ? row.concepts : undefined;
    node.spm = { ...node.spm, gates: { file: selectedFile(node), concepts, positive: row.positive, negative: row.negative,
                                       rank: row.rank, layers: row.layers, transport: row.transport } };
    refresh(node);
  }
}

app.registerExtension({
  name: EXTENSION,

  beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name !== LOADER) return;

    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (output) {
      onExecuted?.apply(this, arguments);
      const info = output?.spm_membrane?.[0];
      if (!info) return;
      const run = { file: selectedFile(this), concepts: [].concat(info.concepts ?? []), rank: info.rank,
                    layers: info.layers, transport: info.transport };
      this.spm = { ...this.spm, run };
      refresh(this);
    };

    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function () {
      onConfigure?.apply(this, arguments);
      refresh(this); // widget values were just restored from the workflow
    };
  },

  nodeCreated(node) {
    if ((node.comfyClass ?? node.type) === TRAINER) {
      // a new SPM Train Membrane keeps its seed: "randomize" would retrain (and refuse to overwrite) on every
      // queue. A workflow's own setting is restored after this, so saved graphs keep theirs.
      const control = node.widgets?.find((w) => w.name === "seed")?.linkedWidgets?.[0];
      if (control) control.value = "fixed";
      return;
    }
    if ((node.comfyClass ?? node.type) !== LOADER || node.widgets?.some((w) => w.name === WIDGET)) return;
    node.addCustomWidget(infoWidget(node));
    const membrane = node.widgets.find((w) => w.name === "membrane");
    if (membrane) {
      const callback = membrane.callback;
      membrane.callback = function () {
        const result = callback?.apply(this, arguments);
        refresh(node);
        return result;
      };
    }
    refresh(node);
  },

  setup() {
    api.addEventListener("spm.gates", onGates);
  },
});
