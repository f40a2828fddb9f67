// SPM for ComfyUI: shows on every SPM Load Membrane node what its membrane erases and, after sampling,
// how far each membrane opened (its Facilitated Transport gates on the positive and negative rows).
//
// Sources: before a run, the selected file name (or "file not found" when the server does not list
// it); after a run, the node's ui payload `spm_membrane` (nodes/load.py); after sampling, the
// websocket event `spm.gates` (nodes/runtime.py), routed to the SPM Load Membrane node whose id it
// names.
//
// The label is a DOM widget: the classic (canvas) renderer places it over the canvas and the Vue
// node renderer ("Nodes 2.0") mounts the same element, so both show every update. It is never
// serialised: a workflow's widgets_values and the API prompt hold only the node's real inputs.
//
// What a run reports belongs to the workflow that queued it: the frontend keeps one graph on screen
// and reuses node ids across workflows, so results (and SPM Train Membrane's progress text) of a
// prompt queued from another open workflow are not shown on this one's nodes.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const EXTENSION = "comfyui_spm.membrane_info";
const LOADER = "SPMLoader";
const TRAINER = "SPMTrain";
const KEEPS_SEED = new Set([TRAINER, "SPMTransportInspector"]);
const OURS = new Set([LOADER, TRAINER, "SPMTextEncode", "SPMTransportInspector", "SPMSaveAsLoRA", "SPMMergeIntoModel"]);
const WIDGET = "spm_info";
const FONT = "12px Arial, sans-serif";
const LINE_HEIGHT = 16;
const PADDING = 3; // above and below the text
const MARGIN = 15; // left and right, as the canvas draws other widgets
const NOT_FOUND = "file not found";
const measure = document.createElement("canvas").getContext("2d");

// --- what to show --------------------------------------------------------------------------

function membraneWidget(node) {
  return node.widgets?.find((w) => w.name === "membrane");
}

function selectedFile(node) {
  return membraneWidget(node)?.value ?? "";
}

// Whether the server lists `file` (the combo's values, refreshed by the frontend's Refresh).
function listed(node, file) {
  let values = membraneWidget(node)?.options?.values;
  if (typeof values === "function") values = values();
  return !Array.isArray(values) || values.includes(file);
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
  if (!concepts && !listed(node, file)) return [NOT_FOUND];
  const lines = concepts
    ? [`${verb(concepts)}: ${concepts.join(", ") || "(no concepts)"}`]
    : [`${verb(conceptsFromFileName(file))}: ${conceptsFromFileName(file).join(", ")} (from the file name)`];
  const details = run ?? (gates?.rank ? gates : null); // a cached Load SPM sends no ui payload: the gates event tells
  if (details) lines.push(`rank ${details.rank} · ${details.layers} layers · transport: ${details.transport}`);
  if (gates) lines.push(`gate last step: positive ${fixed(gates.positive)} · negative ${fixed(gates.negative)}`);
  return lines;
}

// --- the label: a read-only, never serialised DOM widget -------------------------------------

// Word-wraps each paragraph of `text` to `width` pixels: the number of lines.
function lineCount(paragraphs, width) {
  measure.font = FONT;
  let count = 0;
  for (const paragraph of paragraphs) {
    let line = "";
    count += 1;
    for (const word of paragraph.split(" ")) {
      const next = line ? `${line} ${word}` : word;
      if (line && measure.measureText(next).width > width) {
        count += 1;
        line = word;
      } else {
        line = next;
      }
    }
  }
  return count;
}

function labelHeight(node, paragraphs) {
  const lines = lineCount(paragraphs, Math.max(1, (node.size?.[0] ?? 320) - 2 * MARGIN));
  return lines ? lines * LINE_HEIGHT + 2 * PADDING : 0;
}

function addLabel(node) {
  const element = document.createElement("div");
  element.className = "spm-membrane-info";
  element.title = "What this membrane erases and how far it opened in the last sampling step";
  Object.assign(element.style, {
    font: FONT, lineHeight: `${LINE_HEIGHT}px`, boxSizing: "border-box",
    overflow: "hidden", whiteSpace: "normal", overflowWrap: "anywhere", pointerEvents: "none", // the canvas keeps the pointer (drag, select)
  });
  let paragraphs = [];
  const widget = node.addDOMWidget(WIDGET, "spm_info", element, {
    serialize: false, // not in the API prompt
    hideOnZoom: false,
    margin: 0,
    getValue: () => paragraphs.join("\n"),
    setValue: () => {}, // read-only: nothing restores it from a workflow
    getMinHeight: () => labelHeight(node, paragraphs),
    getMaxHeight: () => labelHeight(node, paragraphs),
  });
  widget.serialize = false; // not in widgets_values: saved workflows keep their slots
  widget.show = (next) => {
    paragraphs = next;
    element.replaceChildren(...next.map((text, index) => {
      const line = document.createElement("div");
      line.textContent = text;
      // the concepts stand out; details and gates are secondary
      line.style.color = index === 0 && text !== NOT_FOUND ? "var(--input-text, #ddd)" : "var(--descrip-text, #999)";
      return line;
    }));
  };
  return widget;
}

// Classic renderer: the element spans the node's width, so it keeps the canvas widgets' side margins;
// the Vue node renderer already lays its widgets out inside the node's padding.
function addStyle() {
  const style = document.createElement("style");
  style.textContent = `.spm-membrane-info { padding: ${PADDING}px ${MARGIN}px; }
    [data-node-id] .spm-membrane-info { padding: ${PADDING}px 0; }`;
  document.head.append(style);
}

// The node is as tall as its inputs and label need: no empty space under the label, room for it
// when it grows after a run.
function fit(node) {
  const need = node.computeSize?.()?.[1];
  if (!need || !node.size || Math.abs(node.size[1] - need) < 1) return;
  node.setSize([node.size[0], need]);
}

function refresh(node) {
  const widget = node.widgets?.find((w) => w.name === WIDGET);
  if (!widget?.show) return;
  widget.show(describe(node));
  fit(node);
  node.setDirtyCanvas?.(true, true);
}

// --- which workflow a run belongs to ----------------------------------------------------------

const promptGraphs = new Map(); // prompt id -> {graph: root graph id when queued, types: {node id: class}}
let runningPrompt = null;

// Remembers which workflow (root graph) each prompt of this page was queued from.
function watchQueue() {
  const queuePrompt = api.queuePrompt;
  if (typeof queuePrompt !== "function") return;
  api.queuePrompt = async function (number, data, ...rest) {
    const graph = data?.workflow?.id ?? app.graph?.id;
    const result = await queuePrompt.call(this, number, data, ...rest);
    if (result?.prompt_id) {
      const types = Object.fromEntries(Object.entries(data?.output ?? {}).map(([id, n]) => [String(id), n?.class_type]));
      promptGraphs.set(result.prompt_id, { graph, types });
      while (promptGraphs.size > 100) promptGraphs.delete(promptGraphs.keys().next().value);
    }
    return result;
  };
}

// Whether events of the running prompt belong on the graph shown now. Prompts this page did not
// queue (another tab, an API client) keep the frontend's routing by node id.
function shownWorkflowRuns() {
  const prompt = promptGraphs.get(runningPrompt);
  return !prompt || !prompt.graph || !app.graph?.id || prompt.graph === app.graph.id;
}

// SPM Train Membrane's progress text ("62/200 loss ... ETA") goes out as the server's progress_text,
// which the frontend shows on the node with that id in whatever graph is on screen: drop it when
// the prompt came from another open workflow.
function scopeProgressText() {
  const dispatch = api.dispatchCustomEvent;
  if (typeof dispatch !== "function") return;
  api.dispatchCustomEvent = function (type, detail, ...rest) {
    if (type === "progress_text" && !shownWorkflowRuns()) {
      const prompt = promptGraphs.get(runningPrompt);
      if (OURS.has(prompt?.types?.[String(detail?.nodeId)])) return false; // ids as in the API prompt ("12:7" in subgraphs)
    }
    return dispatch.call(this, type, detail, ...rest);
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
  if (!shownWorkflowRuns()) return;
  for (const row of event?.detail?.membranes ?? []) {
    const node = findLoader(row?.node);
    if (!node) continue;
    const concepts = Array.isArray(row.concepts) ? row.concepts : undefined;
    node.spm = { ...node.spm, gates: { file: selectedFile(node), concepts, positive: row.positive, negative: row.negative,
                                       rank: row.rank, layers: row.layers, transport: row.transport } };
    refresh(node);
  }
}

function refreshAllLoaders() {
  for (const node of app.graph?.nodes ?? []) if ((node.comfyClass ?? node.type) === LOADER) refresh(node);
}

app.registerExtension({
  name: EXTENSION,

  beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name !== LOADER) return;

    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (output) {
      onExecuted?.apply(this, arguments);
      const info = output?.spm_membrane?.[0];
      if (!info || !shownWorkflowRuns()) return;
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

    const onResize = nodeType.prototype.onResize;
    nodeType.prototype.onResize = function () {
      onResize?.apply(this, arguments);
      // a narrower node wraps the label onto more lines
      const widget = this.widgets?.find((w) => w.name === WIDGET);
      if (widget && this.computeSize()[1] > this.size[1] + 0.5) queueMicrotask(() => fit(this));
    };
  },

  nodeCreated(node) {
    if (KEEPS_SEED.has(node.comfyClass ?? node.type)) {
      // a new SPM Train Membrane keeps its seed: "randomize" would retrain (and refuse to overwrite) on every
      // queue; the Inspector's seed stands for the sampler's, which a change would no longer match. A
      // workflow's own setting is restored after this, so saved graphs keep theirs.
      const control = node.widgets?.find((w) => w.name === "seed")?.linkedWidgets?.[0];
      if (control) control.value = "fixed";
      return;
    }
    if ((node.comfyClass ?? node.type) !== LOADER || node.widgets?.some((w) => w.name === WIDGET)) return;
    addLabel(node);
    const membrane = membraneWidget(node);
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
    addStyle();
    api.addEventListener("spm.gates", onGates);
    for (const type of ["execution_start", "executing"]) {
      api.addEventListener(type, (event) => {
        if (event?.detail?.prompt_id) runningPrompt = event.detail.prompt_id;
      });
    }
    watchQueue();
    scopeProgressText();
    // the Refresh button re-lists the membranes: a file that appeared (or vanished) relabels its nodes
    const refreshCombos = app.refreshComboInNodes;
    if (typeof refreshCombos === "function") {
      app.refreshComboInNodes = async function (...args) {
        const result = await refreshCombos.apply(this, args);
        refreshAllLoaders();
        return result;
      };
    }
  },
});
