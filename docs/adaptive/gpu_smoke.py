"""Device smoke check before the long runs: MPS starts and stops, and a 1P+1D cluster under MPS
serves a few requests (llama3-8b random weights). Prints what it saw; exits non-zero on failure."""

import subprocess
import sys
import time

from tetriinfer.bench.server_process import ServerProcess
from tetriinfer.bench.serve_client import run_load_sync
from tetriinfer.bench.workload import build_specs

out = sys.argv[1]
flags = ["--model", "llama3-8b", "--dtype", "bfloat16", "--device", "cuda:0", "--num-blocks", "20000",
         "--chunk-size", "2048", "--max-model-len", "8192", "--predictor", "none", "--mps-sm-shares", "40,60"]
t = time.monotonic()
server = ServerProcess.start(flags, f"{out}/smoke-server.log", timeout_s=300)
print(f"started in {time.monotonic() - t:.1f} s", flush=True)
try:
    load = run_load_sync(server.url, build_specs("mixed", 16, rate=4.0, seed=0, max_total_tokens=8192), model=None,
                         vocab_size=128000, progress=False)
    print("done", len(load.records), "failed", len(load.failures), load.failures_by_reason(), flush=True)
    print(subprocess.run(["nvidia-smi", "-q", "-d", "COMPUTE"], capture_output=True, text=True).stdout[-600:])
    print({k: v for k, v in server.metrics().items() if "local_prefills" in k or "kept_decodes" in k
           or "kv_transfers_total" in k})
finally:
    server.stop(60)
print("mps processes left:", subprocess.run(["pgrep", "-fa", "nvidia-cuda-mps"], capture_output=True, text=True).stdout)
