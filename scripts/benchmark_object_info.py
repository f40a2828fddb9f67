"""How long the frontend waits for the node list with a big LoRA folder (issue 10).

Starts a real ComfyUI server whose models/loras holds N kohya-style LoRA files (tiny tensors,
realistic metadata) plus one SPM membrane, and prints the time of GET /object_info and of
GET /object_info/<node> for SPM Load Membrane and the stock LoraLoader: the first call after the
server started and the median of the following ones (SPM Load Membrane's list then comes from its
cache, a stat per file).

    python scripts/benchmark_object_info.py              # 1,000 LoRAs, 10 repeats
    python scripts/benchmark_object_info.py --loras 5000

COMFYUI_ROOT selects the host tree (default ~/.cache/spm-comfy-host/ComfyUI).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script: the repository, for lab
from lab.comfy_server import ComfyServer  # noqa: E402
from lab.host import host_root  # noqa: E402

KOHYA_METADATA = {"ss_network_module": "networks.lora", "ss_network_dim": "32", "ss_network_alpha": "16",
                  "ss_base_model_version": "sd_v1", "ss_tag_frequency": json.dumps({f"tag{i}": i for i in range(400)})}


def write_loras(folder: str, count: int) -> None:
    """`count` LoRA files with a kohya-sized header, and one SPM membrane among them."""
    import numpy as np
    from safetensors.numpy import save_file

    os.makedirs(folder, exist_ok=True)
    tensors = {f"lora_unet_down_blocks_0_attentions_0_proj_in.lora_{side}.weight": np.zeros((4, 4), np.float16)
               for side in ("down", "up")}
    for index in range(count):
        save_file(tensors, os.path.join(folder, f"style_{index:05d}.safetensors"), metadata=KOHYA_METADATA)
    save_file(tensors, os.path.join(folder, "zz_membrane.safetensors"),
              metadata={"spm_format": "1", "concepts": json.dumps([{"label": "snoopy", "prompts": ["snoopy"]}])})


def timed(server: ComfyServer, path: str) -> float:
    start = time.perf_counter()
    server.get(path, timeout=120)
    return (time.perf_counter() - start) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loras", type=int, default=1000, help="LoRA files in models/loras (default 1000)")
    parser.add_argument("--repeats", type=int, default=10, help="calls after the first (default 10)")
    options = parser.parse_args()
    base = tempfile.mkdtemp(prefix="spm-object-info-")
    write_loras(os.path.join(base, "models", "loras"), options.loras)
    with ComfyServer(host_root(), base) as server:
        print(f"{options.loras} LoRA files in models/loras (+1 SPM membrane); milliseconds, {options.repeats} repeats\n")
        print(f"{'request':34} {'first':>8} {'median':>8} {'max':>8}")
        for path in ("/object_info/SPMLoader", "/object_info/LoraLoader", "/object_info"):
            first = timed(server, path)
            rest = [timed(server, path) for _ in range(options.repeats)]
            print(f"{path:34} {first:8.1f} {statistics.median(rest):8.1f} {max(rest):8.1f}")
        listed = server.get("/object_info/SPMLoader")["SPMLoader"]["input"]["required"]["membrane"]
        choices = listed[1]["options"] if isinstance(listed[0], str) else listed[0]
        if choices != ["loras/zz_membrane.safetensors"]:
            raise SystemExit(f"SPM Load Membrane lists {choices[:5]}, not the one membrane among the LoRAs")
    print("\n'first': the first request after the server started (SPM Load Membrane reads each LoRA header once,"
          "\nthe first time it lists the folder); LoraLoader's list is cached by ComfyUI by folder modification time.")


if __name__ == "__main__":
    main()
