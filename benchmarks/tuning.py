"""The tuning study: does tuning inside one run beat what a user would do instead, and at what cost?

  python benchmarks/tuning.py --experiment=cifar_alexnet --dataset=folder:$HOME/data/cifar10 \
      --max_examples=12500 --epochs=40 --seeds=0,1 --arms=tuned,frozen,plain,random:4,replay \
      --rundir=runs/study --output=benchmarks/results/cifar_alexnet.json --benchmarks_md

Arms in study/arms.py. One `stn-train` per run, `--parallel` at a time with one thread each;
rerun the command to resume (finished runs are reused, unfinished ones resume; a finished run in
the records but not in `--rundir`, as on another machine, is restored from the records). Writes
the records (`--output`), the report and PNG pictures beside them (`<output stem>.md`), and with
`--benchmarks_md` the `tuning_<experiment>` section of BENCHMARKS.md. `--report_only`: report only.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import BENCHMARKS_MD, cpu_bf16_line, machine_line, replace_section  # noqa: E402
from study import arms, plots, records, runner, summary  # noqa: E402

from stn_pipeline import experiments  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("experiment", "cifar_cnn", "Experiment of every run.")
flags.DEFINE_string("dataset", None, "--dataset of stn-train (e.g. folder:<dir>).")
flags.DEFINE_string("arms", "tuned,frozen", "Comma list of " + ", ".join(arms.ARMS)
                    + " (random as random:N).")
flags.DEFINE_list("seeds", ["0"], "Study seeds (--seed of the runs).")
flags.DEFINE_integer("epochs", 20, "--epochs of every run.")
flags.DEFINE_integer("max_examples", 0, "--max_examples of every run (0: all).")
flags.DEFINE_enum("precision", "float32", ["float32", "mixed_bfloat16"], "--precision of every run.")
flags.DEFINE_string("rundir", "/tmp/stn_study", "Folder of the runs' logdirs and logs.")
flags.DEFINE_string("output", None, "Records file (default: benchmarks/results/<experiment>.json).")
flags.DEFINE_integer("parallel", 2, "Runs at a time (each --threads=1).")
flags.DEFINE_string("extra_flags", "", "Further stn-train flags for every run (shell words).")
flags.DEFINE_bool("report_only", False, "Only redo the report from the records.")
flags.DEFINE_bool("benchmarks_md", False, "Also rewrite the study's section of BENCHMARKS.md.")


def _settings() -> arms.StudySettings:
    return arms.StudySettings(experiment=FLAGS.experiment, dataset=FLAGS.dataset or "",
                              epochs=FLAGS.epochs, rundir=os.path.abspath(FLAGS.rundir),
                              max_examples=FLAGS.max_examples, precision=FLAGS.precision,
                              extra_flags=tuple(shlex.split(FLAGS.extra_flags)))


def _run_study(settings, runs, specs, output: str) -> dict[str, str]:
    """Runs what is unfinished, writing the records after every finished run."""
    # Restored runs keep their entries (and the machine they ran on): never collected anew.
    restored = [run.logdir for run in records.restore(runs, settings, records.load(output)["runs"])]
    for logdir in restored:
        print(f"{os.path.basename(logdir)}: restored from {output}")
    failed = {}
    for run in runs:
        results = arms.read_results(run.logdir)
        problem = results is not None and runner.mismatch(run, settings, results)
        if problem:
            failed[run.logdir] = problem
            print(f"{run.name}: {problem}")
    command = " ".join(["python benchmarks/tuning.py", *sys.argv[1:]])
    commands = records.load(output).get("study", {}).get("commands", [])
    study = {"commands": commands + [command] * (command not in commands),
             "machine": machine_line(), "parallel": FLAGS.parallel}

    def write_records(unused_run=None):
        entries = records.collect(runs, settings, specs, skip=list(failed) + restored,
                                  machine=f"{machine_line(date=False)}; {cpu_bf16_line()}")
        records.write(output, study, records.merge(records.load(output)["runs"], entries))

    def start(run):
        return runner.launch(arms.command(run, settings, specs), run.logdir)

    write_records()
    failed.update(runner.run_all([r for r in runs if r.logdir not in failed], start,
                                 FLAGS.parallel, on_finished=write_records))
    write_records()
    return failed


def _report(output: str) -> bool:
    """Prints the report, writes `<stem>.md` and the pictures next to the records."""
    data = records.load(output)
    if not data["runs"]:
        print(f"tuning.py: {output} holds no finished runs to report.")
        return False
    stem = os.path.splitext(output)[0]
    pictures = {}
    try:
        tuned = [e for e in data["runs"] if e["arm"] == "tuned" and e.get("trajectory")]
        if tuned:
            plots.plot_trajectories(min(tuned, key=lambda e: e["seed"]), stem + "_trajectories.png")
            pictures["hyperparameters of a tuned run"] = stem + "_trajectories.png"
        plots.plot_val_losses(data["runs"], stem + "_val_loss.png")
        pictures["validation loss per epoch"] = stem + "_val_loss.png"
    except plots.MissingMatplotlib as error:
        if FLAGS.benchmarks_md:
            sys.exit(f"tuning.py: {error}")
        print(f"WARNING: no pictures: {error}")

    def section(folder: str) -> str:  # picture links relative to the markdown file's folder
        return summary.tuning_section(data.get("study", {}), data["runs"], {
            caption: os.path.relpath(path, folder) for caption, path in pictures.items()})

    try:
        local = section(os.path.dirname(output))
    except ValueError as error:
        sys.exit(f"tuning.py: {output}: {error}")
    print(local)
    with open(stem + ".md", "w") as handle:
        handle.write(local + "\n")
    if FLAGS.benchmarks_md:
        replace_section(f"tuning_{data['runs'][0]['experiment']}",
                        section(os.path.dirname(BENCHMARKS_MD)))
    return True


def main(argv):
    del argv  # Unused.
    settings = _settings()
    output = os.path.abspath(FLAGS.output or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "results", f"{FLAGS.experiment}.json"))
    try:
        arm_counts = arms.parse_arms(FLAGS.arms)
        if not all(seed.isdigit() for seed in FLAGS.seeds) or FLAGS.parallel < 1:
            raise ValueError(f"--seeds={','.join(FLAGS.seeds)} must be integers >= 0 and "
                             f"--parallel={FLAGS.parallel} >= 1.")
        seeds = [int(seed) for seed in FLAGS.seeds]
        specs = experiments.hparam_specs(experiments.RunConfig(experiment=FLAGS.experiment)).tuned
    except KeyError:
        sys.exit(f"tuning.py: --experiment={FLAGS.experiment} is not one of "
                 f"{sorted(experiments.EXPERIMENTS)}.")
    except ValueError as error:
        sys.exit(f"tuning.py: {error}")
    # A killed study stops its runs (SystemExit unwinds through the scheduler); rerun resumes.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    failed = {}
    if not FLAGS.report_only:
        if not FLAGS.dataset:
            sys.exit("tuning.py: --dataset is required to run the study (e.g. folder:<dir>).")
        failed = _run_study(settings, arms.plan_runs(settings, arm_counts, seeds, specs), specs,
                            output)
    if not _report(output) and FLAGS.report_only:
        sys.exit(1)
    if failed:
        sys.exit("tuning.py: runs that failed or did not run:\n" + "\n".join(
            f"  {os.path.basename(logdir)}: {why}" for logdir, why in failed.items()))


if __name__ == "__main__":
    app.run(main)
