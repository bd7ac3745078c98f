// usp-video: the USP group's state on the "USP Group" node (ranks, ulysses x ring, weights per rank,
// free memory per rank, the last run's step time), kept current by the server's "usp_video.status"
// websocket event (nodes/services.py, publish_status) and read once from /usp_video/status when the
// page opens. The text lives in a read-only box that is never saved with the workflow.
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";
import { ComfyWidgets } from "../../../scripts/widgets.js";

const NODE_TYPE = "UspGroup";
const WIDGET_NAME = "usp_status";
let latest = "no group running";

function statusWidget(node) {
  let widget = node.widgets?.find((w) => w.name === WIDGET_NAME);
  if (!widget) {
    widget = ComfyWidgets.STRING(node, WIDGET_NAME, ["STRING", { multiline: true }], app).widget;
    widget.serialize = false; // not in the workflow's widgets_values
    widget.options = { ...(widget.options || {}), serialize: false }; // not in the prompt
    if (widget.inputEl) {
      widget.inputEl.readOnly = true;
      widget.inputEl.style.opacity = 0.75;
    }
  }
  return widget;
}

function show(node, text) {
  const widget = statusWidget(node);
  widget.value = text;
  if (widget.inputEl) widget.inputEl.value = text;
  node.setDirtyCanvas?.(true, true);
}

function showOnAll(text) {
  latest = text;
  for (const node of app.graph?._nodes ?? []) {
    if (node.type === NODE_TYPE) show(node, text);
  }
}

async function readState() {
  try {
    const response = await api.fetchApi("/usp_video/status");
    if (response.ok) showOnAll((await response.json()).text ?? latest);
  } catch (error) {
    console.warn("usp-video: could not read the group's state", error);
  }
}

app.registerExtension({
  name: "usp_video.status",
  async setup() {
    api.addEventListener("usp_video.status", (event) => showOnAll(event.detail?.text ?? ""));
    api.addEventListener("reconnected", readState); // a restarted server: its state, not the old one
    await readState();
  },
  async nodeCreated(node) {
    if (node.comfyClass === NODE_TYPE || node.type === NODE_TYPE) show(node, latest);
  },
});
