"""Summarises a `perf record` profile of one engine's training steps: where the time goes, by category.

Reads ``perf report --stdio --no-children --sort dso,sym -g none --field-separator=@`` output (the lines
``overhead@dso@[.] symbol``), demangles Swift symbols with ``swift demangle --simplified`` when the toolchain is
on PATH, and sorts every sample into one of:

* GEMM            — OpenBLAS / MKL / oneDNN matrix kernels and their packing (``*gemm*``, ``*_kernel*``,
                     ``*copy*`` in the BLAS library, JIT code with no symbol: perf names oneDNN's kernels ``[JIT] tid N``)
* attention       — softmax and attention-named functions
* elementwise     — the rest of the engines' own math (norms, activations, adds, reductions, optimizer)
* allocation      — malloc/free, zeroing new memory (memset) and the kernel's page-fault and page-clearing work
* threading idle  — threads waiting for work: OpenBLAS's thread server, Graft's worker pool (its own time is
                     polling for chunks), all of libgomp (OpenMP's barriers and
                     spin-waits, whose symbols perf often cannot resolve), sched_yield, futex
* runtime         — Swift ARC and runtime, the Python interpreter
* other

Usage: python3 perf_summary.py REPORT.txt [--top 10]. Prints a Markdown table of the categories and the top
functions by self time. The categories are heuristics on names; the top list is the ground truth.
"""

import argparse
import re
import shutil
import subprocess

CATEGORIES = ["GEMM", "attention", "elementwise", "allocation", "threading idle", "runtime", "other"]


def demangle(symbols):
    """Swift-demangles a list of symbols (unchanged when swift is not on PATH)."""
    swift = shutil.which("swift")
    if not swift:
        return symbols
    out = subprocess.run([swift, "demangle", "--simplified", "--compact"], input="\n".join(symbols), text=True,
                         capture_output=True).stdout.split("\n")
    return [o if o else s for s, o in zip(symbols, out + [""] * len(symbols))]


def category(dso, sym):
    """The category of one (library, function) pair."""
    s, d = sym.lower(), dso.lower()
    if d.startswith("libgomp"):
        # OpenMP's runtime: its CPU time is threads spinning or sleeping at barriers, waiting for work.
        return "threading idle"
    if re.search(r"blas_thread_server|cgraft_pool_run|worker_main|sched_yield|gomp_(team_)?barrier|gomp_.*wait|do_spin|futex|pthread_cond|"
                 r"exec_blas_async_wait|syscall|sched_yield|(^|\s)(__)?schedule(\s|$)|finish_task_switch|do_sched_yield", s):
        return "threading idle"
    if re.search(r"malloc|free|calloc|realloc|memset|clear_page|page_fault|do_anonymous_page|"
                 r"alloc_pages|__memset|_int_|rmqueue|get_page_from_freelist|zap_|unmap|mmap|munmap|"
                 r"handle_mm_fault|swift_allocobject|swift_slowalloc|swift_deallocobject|posix_memalign|"
                 r"tensor\(zeros|uninitialized", s):
        return "allocation"
    if "openblas" in d or re.search(r"gemm|mkl_blas|dnnl|brgemm|jit_|sgemv|_kernel_|oncopy|incopy|otcopy|itcopy", s) \
            or d in ("[unknown]", "[anon]") or d.startswith("[jit]"):
        return "GEMM"
    if re.search(r"softmax|attention|sdpa|scaled_dot|flash", s):
        return "attention"
    if re.search(r"swift_retain|swift_release|swift_bridge|swift_beginaccess|swift_endaccess|swift_dynamiccast|"
                 r"swift_getgeneric|swift_|_pyeval|pyobject|_py|python", s) or "libpython" in d:
        return "runtime"
    if "[k]" in sym or d.startswith("[kernel"):
        return "other"
    if d.startswith(("graft", "libtorch", "libc10", "libgraft")) or "libm" in d or "libc.so" in d:
        return "elementwise"
    return "other"


def parse(path):
    """``[(percent, dso, symbol)]`` from a perf report file."""
    rows = []
    with open(path, errors="replace") as f:
        for line in f:
            if line.startswith("#") or "@" not in line:
                continue
            parts = line.rstrip("\n").split("@", 2)
            if len(parts) < 3:
                continue
            try:
                pct = float(parts[0].strip().rstrip("%"))
            except ValueError:
                continue
            rows.append((pct, parts[1].strip(), parts[2].strip()))
    return rows


def main():
    ap = argparse.ArgumentParser(description="Summarise a perf report by category.")
    ap.add_argument("report")
    ap.add_argument("--top", type=int, default=10)
    a = ap.parse_args()
    rows = parse(a.report)
    names = demangle([re.sub(r"^\[[.k]\]\s*", "", r[2]) for r in rows])
    totals = {c: 0.0 for c in CATEGORIES}
    for (pct, dso, sym), name in zip(rows, names):
        totals[category(dso, sym + " " + name)] += pct
    print("| category | share of samples |")
    print("|---|---|")
    for c in CATEGORIES:
        print(f"| {c} | {totals[c]:.1f} % |")
    print()
    print("| # | self | function | library |")
    print("|---|---|---|---|")
    ranked = sorted(zip(rows, names), key=lambda x: -x[0][0])[: a.top]
    for i, ((pct, dso, sym), name) in enumerate(ranked, 1):
        short = name if len(name) <= 110 else name[:107] + "..."
        print(f"| {i} | {pct:.1f} % | `{short}` | {dso} | ")


if __name__ == "__main__":
    main()
