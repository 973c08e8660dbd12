"""Turn a pytest-benchmark JSON into the markdown results table committed under
benchmarks/results/ (device, versions, date, command, and one row per benchmark with its
ratio to the same-run baseline and its fraction of the ideal speedup)."""
import argparse
import json
import platform


def main():
    p = argparse.ArgumentParser()
    p.add_argument("json")
    p.add_argument("--command", default="pytest benchmarks/ --benchmark-only")
    a = p.parse_args()
    d = json.load(open(a.json))
    mi = d.get("machine_info", {})
    rows = d.get("benchmarks", [])
    dev = next((b["extra_info"].get("device") for b in rows if b.get("extra_info")), "?")
    print(f"# diffcr benchmarks\n\n- device: {dev}\n- date: {d.get('datetime', '?')}")
    print(f"- python {mi.get('python_version', platform.python_version())}, "
          f"{mi.get('cpu', {}).get('brand_raw', '')}")
    versions = next((b["extra_info"].get("versions") for b in rows
                     if b.get("extra_info", {}).get("versions")), None)
    if versions:
        print(f"- versions: {versions}")
    print(f"- command: `{a.command}`\n")
    keys = ["baseline", "kappa", "speedup", "ideal_speedup", "fraction_of_ideal",
            "speedup_vs_torch", "GB_per_s", "fraction_of_copy_bw", "overhead_fraction",
            "peak_mem_MB", "baseline_peak_mem_MB"]
    present = [k for k in keys if any(k in b.get("extra_info", {}) for b in rows)]
    print("| benchmark | median (ms) | " + " | ".join(present) + " |")
    print("|---|---|" + "---|" * len(present))
    for b in rows:
        ex = b.get("extra_info", {})
        cells = []
        for k in present:
            v = ex.get(k, "")
            cells.append(f"{v:.3g}" if isinstance(v, float) else str(v))
        print(f"| {b['name']} | {b['stats']['median'] * 1e3:.3f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
