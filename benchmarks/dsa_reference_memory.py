"""Peak memory and time of the DSA torch reference for one layer at long context, on CPU.

One layer of Keye-VL-2.0 with full-size head shapes: main attention q [B, T, 32, 128], k/v [B, S, 4, 128];
indexer q [B, T, 16, 64], w [B, T, 16], k [B, S, 64]; top-k 2048. Runs ``dsa_topk_indices`` then
``sparse_attention`` (forward, no grad) in a fresh subprocess and reports its peak RSS (VmHWM), the RSS
after the inputs were built, and the wall and CPU time of each step, as JSON. The int64 index list
alone is B * T * 2048 * 8 bytes (512 MiB at 32K) and the bf16 output 256 MiB; the rest of the growth
over the inputs is the chunked working memory.

    python benchmarks/dsa_reference_memory.py                 # S = T = 32768, bf16 inputs
    python benchmarks/dsa_reference_memory.py --seq 8192 --dtype float32 --out result.json
    python benchmarks/dsa_reference_memory.py --threads 1   # on a shared/oversubscribed CPU

For scale: one [S, S] fp32 buffer at S = 32768 is 4 GiB.
"""

import argparse
import json
import os
import subprocess
import sys
import time


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def _child(args) -> None:
    import torch

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "kernels"))
    from keye_dsa_reference import dsa_topk_indices, sparse_attention

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    B, T, S = 1, args.seq, args.seq
    q = torch.randn(B, T, 32, 128, dtype=dtype)
    k = torch.randn(B, S, 4, 128, dtype=dtype)
    v = torch.randn(B, S, 4, 128, dtype=dtype)
    qi = torch.randn(B, T, 16, 64, dtype=dtype)
    wi = torch.randn(B, T, 16, dtype=dtype)
    ki = torch.randn(B, S, 64, dtype=dtype)
    import resource

    rss_inputs = _status_kib("VmRSS")
    with torch.no_grad():
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        idx = dsa_topk_indices(qi, wi, ki, args.topk, chunk_size=args.chunk_size)
        t1 = time.perf_counter()
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        rss_topk = _status_kib("VmHWM")
        out = sparse_attention(q, k, v, idx, scaling=128 ** -0.5)
        t2 = time.perf_counter()
        r2 = resource.getrusage(resource.RUSAGE_SELF)
    peak_dsa = _status_kib("VmHWM")
    full = int((idx[0, -1] >= 0).sum())
    # checked in slices: isfinite on the whole bf16 output would itself take an fp32-sized temporary
    finite = all(bool(torch.isfinite(out[:, i:i + 1024]).all()) for i in range(0, T, 1024))
    print(json.dumps({
        "seq": S, "topk": args.topk, "dtype": args.dtype, "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "rss_after_inputs_MiB": round(rss_inputs / 1024, 1),
        "peak_rss_after_topk_MiB": round(rss_topk / 1024, 1),
        "peak_rss_MiB": round(peak_dsa / 1024, 1),
        "topk_s": round(t1 - t0, 2), "sparse_attention_s": round(t2 - t1, 2), "total_s": round(t2 - t0, 2),
        # CPU seconds (user + sys, all threads): less sensitive than wall time to other load on the machine
        "topk_cpu_s": round(r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime, 2),
        "sparse_attention_cpu_s": round(r2.ru_utime + r2.ru_stime - r1.ru_utime - r1.ru_stime, 2),
        "loadavg_1min_at_end": round(os.getloadavg()[0], 2),
        "last_query_listed_keys": full, "out_finite": finite,
        "dense_SxS_fp32_buffer_MiB": S * S * 4 / 2**20,
    }))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, default=32768)
    ap.add_argument("--topk", type=int, default=2048)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--chunk-size", type=int, default=None)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args)
        return
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--seq", str(args.seq), "--topk", str(args.topk),
           "--dtype", args.dtype, "--threads", str(args.threads)]
    if args.chunk_size is not None:
        cmd += ["--chunk-size", str(args.chunk_size)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        sys.stderr.write(res.stderr)
        raise SystemExit(res.returncode)
    result = json.loads(res.stdout.strip().splitlines()[-1])
    import resource

    # the child's whole-life peak as the kernel accounts it (ru_maxrss of the waited-for child, KiB)
    result["child_ru_maxrss_incl_checks_MiB"] = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _meta import run_meta

    result["meta"] = run_meta()
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
