"""Start-up cost of ``import modelscope_plugin`` on top of ModelScope's own pipeline import.

Each run is a fresh interpreter; the two commands alternate (paired runs) and each child reports its own wall time
and peak resident memory. Prints the medians and the differences (target: at most 0.5 s and 100 MiB above
``from modelscope.pipelines import pipeline`` alone).

    .venv/bin/python benchmarks/startup_speed.py --runs 5
"""
import argparse
import json
import statistics
import subprocess
import sys

CHILD = """
import json, resource, sys, time
start = time.perf_counter()
{statement}
elapsed = time.perf_counter() - start
print(json.dumps({{"seconds": elapsed, "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                   "torchvision": "torchvision" in sys.modules}}))
"""
COMMANDS = {
    "modelscope": "from modelscope.pipelines import pipeline",
    "modelscope + plugin": "import modelscope_plugin\nfrom modelscope.pipelines import pipeline",
}


def run_child(statement: str) -> dict:
    output = subprocess.run([sys.executable, "-c", CHILD.format(statement=statement)], capture_output=True,
                            text=True, check=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    arguments = parser.parse_args()
    results = {name: [] for name in COMMANDS}
    run_child(COMMANDS["modelscope"])  # warm the file cache once
    for _ in range(arguments.runs):
        for name, statement in COMMANDS.items():
            results[name].append(run_child(statement))
    medians = {name: {key: statistics.median(run[key] for run in runs) for key in ("seconds", "peak_mib")}
               for name, runs in results.items()}
    for name, median in medians.items():
        print(f"{name:22s} {median['seconds']:.2f} s  {median['peak_mib']:.0f} MiB  "
              f"(torchvision imported: {results[name][-1]['torchvision']})")
    base, ours = medians["modelscope"], medians["modelscope + plugin"]
    differences = [run_ours["seconds"] - run_base["seconds"]
                   for run_base, run_ours in zip(results["modelscope"], results["modelscope + plugin"])]
    print(f"difference: median of paired runs {statistics.median(differences):+.2f} s, "
          f"peak memory {ours['peak_mib'] - base['peak_mib']:+.0f} MiB")


if __name__ == "__main__":
    main()
