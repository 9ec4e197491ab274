"""The report of a study, from its records: per-arm figures, gains of tuned, compute.

Gains are per seed, `baseline test loss - tuned test loss` at each run's best-validation epoch
(positive: tuning reached the lower test loss), and `tuned accuracy - baseline accuracy`. The
random search's answer for a seed is its trial with the lowest validation loss.
"""

from __future__ import annotations

import statistics
from typing import Sequence

from study.arms import ARMS

BEST_RANDOM = "random (best by val loss)"


def _spread(values: Sequence[float | None], digits: int) -> str:
    values = [value for value in values if value is not None]  # a run without a test split
    if not values:
        return "n/a"
    mean = statistics.mean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} [{min(values):.{digits}f}-{max(values):.{digits}f}]"


def _parameters(entries: Sequence[dict]) -> str:
    counts = sorted({e["num_parameters"] for e in entries if e.get("num_parameters")})
    return "/".join(f"{count:,}" for count in counts) or "n/a"


def best_random(runs: Sequence[dict]) -> dict[int, dict]:
    """Per seed, the random trial with the lowest validation loss."""
    best = {}
    for entry in runs:
        if entry["arm"] == "random" and (entry["seed"] not in best
                                         or entry["val_loss"] < best[entry["seed"]]["val_loss"]):
            best[entry["seed"]] = entry
    return best


def by_arm(runs: Sequence[dict]) -> dict[str, dict[int, dict]]:
    """{arm: {seed: entry}} for every arm with one run per seed, plus the random search's answer."""
    arms = {}
    for entry in runs:
        if entry["arm"] != "random":
            arms.setdefault(entry["arm"], {})[entry["seed"]] = entry
    if any(entry["arm"] == "random" for entry in runs):
        arms[BEST_RANDOM] = best_random(runs)
    return arms


def gains(runs: Sequence[dict]) -> dict[str, dict[int, tuple[float, float]]]:
    """{baseline: {seed: (test-loss gain, accuracy gain)}} of tuned, over seeds both have run."""
    arms = by_arm(runs)
    tuned = arms.pop("tuned", {})
    return {baseline: {seed: (entries[seed]["test_loss"] - tuned[seed]["test_loss"],
                              tuned[seed]["test_accuracy"] - entries[seed]["test_accuracy"])
                       for seed in sorted(set(entries) & set(tuned))
                       if entries[seed]["test_loss"] is not None
                       and tuned[seed]["test_loss"] is not None}
            for baseline, entries in arms.items()}


def _arm_rows(runs: Sequence[dict]) -> list[str]:
    groups = {arm: [e for e in runs if e["arm"] == arm] for arm in ARMS}
    groups["random (all trials)"] = groups.pop("random")
    groups[BEST_RANDOM] = list(best_random(runs).values())
    rows = ["| arm | runs | best epoch | val loss | test loss | test accuracy | minutes | "
            "parameters |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for arm, entries in groups.items():
        if entries:
            spreads = [_spread([e[key] for e in entries], digits) for key, digits in (
                ("best_epoch", 1), ("val_loss", 4), ("test_loss", 4), ("test_accuracy", 4),
                ("minutes", 1))]
            rows.append(f"| {arm} | {len(entries)} | {' | '.join(spreads)} | "
                        f"{_parameters(entries)} |")
    return rows


def _gain_rows(runs: Sequence[dict]) -> list[str]:
    rows = ["| tuned against | seeds | test-loss gain per seed | mean test-loss gain | "
            "mean relative | mean accuracy gain | tuned lower test loss on |",
            "|---|---:|---|---:|---:|---:|---:|"]
    arms = by_arm(runs)
    for baseline, per_seed in gains(runs).items():
        if not per_seed:
            continue
        losses = [loss for loss, _ in per_seed.values()]
        relative = [loss / arms[baseline][seed]["test_loss"]
                    for seed, (loss, _) in per_seed.items()]
        wins = sum(loss > 0 for loss in losses)
        rows.append(f"| {baseline} | {len(per_seed)} | "
                    + ", ".join(f"{seed}: {loss:+.4f}" for seed, (loss, _) in per_seed.items())
                    + f" | {statistics.mean(losses):+.4f} | {100 * statistics.mean(relative):+.1f}% "
                    f"| {statistics.mean(acc for _, acc in per_seed.values()):+.4f} | "
                    f"{wins} of {len(per_seed)} seeds |")
    return rows


def compute_line(runs: Sequence[dict]) -> str:
    """Tuned's minutes per seed against the random search's total per seed."""
    tuned = [e["minutes"] for e in runs if e["arm"] == "tuned"]
    trials = [e for e in runs if e["arm"] == "random"]
    if not tuned or not trials:
        return ""
    seeds = sorted({e["seed"] for e in trials})
    totals = [sum(e["minutes"] for e in trials if e["seed"] == seed) for seed in seeds]
    counts = sorted({sum(e["seed"] == seed for e in trials) for seed in seeds})
    return (f"Compute: a tuned run took {statistics.mean(tuned):.1f} min (mean over "
            f"{len(tuned)} runs); the random search of {'/'.join(map(str, counts))} plain runs "
            f"took {statistics.mean(totals):.1f} min per seed in total, "
            f"{statistics.mean(totals) / statistics.mean(tuned):.2f}x the tuned run.")


def _machine_lines(runs: Sequence[dict]) -> list[str]:
    """Where the runs ran, if the records say (minutes compare only on one machine)."""
    machines = {}
    for entry in runs:
        if entry.get("machine"):
            name = entry["arm"] + (f" t{entry['trial']}" if entry["trial"] is not None else "")
            machines.setdefault(entry["machine"], []).append(f"{name} s{entry['seed']}")
    if len(machines) < 2:
        return [f"All runs on: {machine}." for machine in machines]
    return ["Runs on more than one machine (their minutes do not compare):"] + [
        f"- {machine}: {', '.join(names)}" for machine, names in machines.items()]


def tuning_section(study: dict, runs: Sequence[dict], pictures: dict[str, str]) -> str:
    """The BENCHMARKS.md section of a study (`pictures`: caption -> relative PNG path)."""
    experiments = sorted({e["experiment"] for e in runs})
    if len(experiments) != 1:
        raise ValueError(f"the records hold runs of {len(experiments)} experiments "
                         f"({', '.join(experiments)}); a report covers one.")
    settings = sorted({(e["epochs"], e["max_examples"], e["precision"]) for e in runs})
    lines = [f"## Tuning study: {experiments[0]}", "",
             "; ".join(f"`{c}`" for c in study.get("commands", ["python benchmarks/tuning.py"]))
             + f" ({study.get('machine', 'machine not recorded')}).",
             "Settings (epochs, max_examples, precision): "
             + "; ".join(f"{e}, {m or 'all'}, {p}" for e, m, p in settings)
             + ". Every figure is at the run's best-validation epoch; test on the test split. "
             "Spread: mean [min-max] over runs. Runs one thread each, "
             f"{study.get('parallel', '?')} at a time.", *_machine_lines(runs), "",
             *_arm_rows(runs), ""]
    gain_rows = _gain_rows(runs)
    if len(gain_rows) > 2:
        lines += ["Gains of tuned (baseline minus tuned test loss; positive: tuning wins):", "",
                  *gain_rows, ""]
    if compute_line(runs):
        lines += [compute_line(runs), ""]
    lines += [f"![{caption}]({path})" for caption, path in pictures.items()]
    return "\n".join(lines)
