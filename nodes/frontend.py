"""Messages to the ComfyUI frontend (web/spm.js): the gates a sampling run used, training progress.
Without a running server (scripts, in-process tests) nothing is sent."""

from __future__ import annotations

from .gating import MembraneState


def _server():
    try:
        from server import PromptServer
    except ImportError:
        return None
    return getattr(PromptServer, "instance", None)


def gate_report(state: MembraneState) -> list[dict]:
    """What the frontend shows: each membrane's gates in the last sampled step."""
    report = []
    for index, entry in enumerate(state.entries):
        row = {"membrane": entry.membrane.name, "concepts": entry.membrane.concept_labels, "node": entry.node_id,
               "rank": entry.membrane.rank, "layers": len(entry.membrane.layers), "transport": entry.transport.mode.value}
        for kind, gates in state.last_gates.items():
            row[kind] = round(gates[index], 4)
        report.append(row)
    return report


def send_gate_report(state: MembraneState) -> None:
    server = _server()
    if server is not None:
        server.send_sync("spm.gates", {"membranes": gate_report(state)}, server.client_id)


def send_progress_text(text: str, node_id: str) -> None:
    server = _server()
    if server is not None:
        server.send_progress_text(text, node_id)
