"""The suite's slow end-to-end runs: example scripts and fresh interpreters, each a subprocess from its command line,
started when the session's tests are collected and run one after another beside the in-process tests.

One pytest process keeps one core busy, and these runs were nearly half of the suite's time (the speed section alone
took 2 minutes on a busy 2-core machine), spent waiting for the command. Now conftest starts the runs the collected
tests need (those marked ``@pytest.mark.background(name)``) in the order the tests come, one at a time in a worker
thread; the test that checks a run waits for it (:func:`result`) and asserts on what it printed and wrote, as when it
ran the command itself. A run whose turn has not come when its test asks runs at once, in the test.

Every run gets a folder of its own for what it writes, and a diffusers modules cache of its own (custom-code loads
write their files there; see conftest). What a run reads (a saved pipeline) is written by its ``prepare`` in the
main thread when the runs start, never in the worker thread: building a model seeds torch's global RNG inside
``fork_rng``, which would race with the tests running beside it. The worker thread only starts processes and waits.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Run:
    """One command: ``command(folder)`` gives its arguments (run in the repository root), ``prepare(folder)`` writes
    what it reads first, ``env`` is added to the test process's environment."""

    name: str
    command: Callable[[Path], list[str]]
    env: dict[str, str] = field(default_factory=dict)
    timeout: float = 300
    prepare: Callable[[Path], None] | None = None
    folder: Path | None = None
    state: str = "new"  # new -> queued -> running -> done
    outcome: subprocess.CompletedProcess[str] | BaseException | None = None
    process: subprocess.Popen[str] | None = None
    done: threading.Event = field(default_factory=threading.Event)


def _free_port() -> int:
    """A port nothing listens on now (a fixed one collides with a lingering or parallel run)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _marked_page(folder: Path) -> None:
    """A docs folder whose results page holds an empty families block (``--write-docs`` fills it)."""
    import results_doc

    (folder / "docs").mkdir()
    (folder / "docs" / results_doc.RESULTS_PAGE).write_text(
        "# R\n\n<!-- benchmark:families -->\n<!-- /benchmark:families -->\n"
    )


def _gibbs_pipeline_folder(folder: Path) -> None:
    """A MomentMatchingGibbsPipeline over the tiny DDPM UNet, saved (custom-class model_index.json)."""
    from diffusers import DDPMScheduler
    from tiny_pipelines import tiny_ddpm_pipeline

    from mmgibbs import MomentMatchingGibbsPipeline

    MomentMatchingGibbsPipeline(unet=tiny_ddpm_pipeline().unet, scheduler=DDPMScheduler()).save_pretrained(
        folder / "pipe"
    )


def drop_in_pipeline() -> Any:
    """The tiny DDPM pipeline with MMGibbsScheduler (covariance none, 2 sweeps), as test_conformance samples it."""
    from tiny_pipelines import tiny_ddpm_pipeline

    from mmgibbs import MMGibbsScheduler

    pipe = tiny_ddpm_pipeline()
    pipe.scheduler = MMGibbsScheduler.from_config(pipe.scheduler.config, covariance="none", gibbs_sweeps=2)
    return pipe


def _drop_in_pipeline_folder(folder: Path) -> None:
    drop_in_pipeline().save_pretrained(folder / "pipe")


def _distributed(folder: Path) -> list[str]:
    """accelerate launch: 3 processes, 2 samples (the third process gets none), seed 5."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "3"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launch += ["--main_process_port", str(_free_port())]
    script = ["examples/distributed_sample.py", "--batch-size", "2", "--steps", "3", "--seed", "5"]
    return [*launch, *script, "--out", str(folder / "grid.png"), "--save-array", str(folder / "images.npy")]


def _python(script: str) -> Callable[[Path], list[str]]:
    return lambda folder: [sys.executable, "-c", script, str(folder / "pipe")]


OFFLINE = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
SRC = {"PYTHONPATH": str(ROOT / "src")}
BENCH = [sys.executable, "examples/benchmark.py", "--quick", "--threads", "1"]
TOY_DEMO = ["--num-samples", "300", "--sweeps", "3"]


def _write_docs(folder: Path) -> list[str]:
    return ["--write-docs", "--docs-dir", str(folder / "docs")]


#: the runs, by name: (the tests that check them)
RUNS: dict[str, Run] = {
    run.name: run
    for run in [
        # test_bad_inputs: a Hub id with HF_HUB_OFFLINE=1
        Run(
            "offline-hub-id",
            lambda f: [sys.executable, "examples/sample.py", "--model", "google/ddpm-cifar10-32", "--steps", "2"],
            OFFLINE,
        ),
        # test_conformance::test_saved_pipeline_reloads_in_a_fresh_interpreter
        Run(
            "drop-in-fresh-interpreter",
            _python(
                "import json, sys, torch\n"
                "from diffusers import DiffusionPipeline\n"
                "assert 'mmgibbs' not in sys.modules\n"
                "pipe = DiffusionPipeline.from_pretrained(sys.argv[1], trust_remote_code=True)\n"
                "pipe.set_progress_bar_config(disable=True)\n"
                "g = torch.Generator().manual_seed(0)\n"
                "out = pipe(batch_size=1, num_inference_steps=2, generator=g, output_type='np').images\n"
                "cls, sweeps = type(pipe.scheduler), pipe.scheduler.config.gibbs_sweeps\n"
                "print(json.dumps([cls.__module__, cls.__name__, sweeps, float(out.sum())]))\n"
            ),
            {**SRC, "HF_HUB_OFFLINE": "1"},
            timeout=600,
            prepare=_drop_in_pipeline_folder,
        ),
        # test_examples::test_distributed_job_gathers_each_process_slice
        Run("distributed-job", _distributed, OFFLINE),
        # test_examples::test_toy_demo_writes_its_table_and_figure
        Run(
            "toy-demo",
            lambda f: [sys.executable, "examples/toy_mog.py", *TOY_DEMO, "--out", str(f / "t.png")],
            OFFLINE,
        ),
        # test_examples::test_benchmark_quick_run_prints_measured_tables
        Run("benchmark-toy", lambda f: [*BENCH, "--out-dir", str(f / "bench"), "--section", "toy"], OFFLINE),
        # test_pipeline::test_saved_pipeline_loads_with_diffusers_alone_in_a_fresh_interpreter
        Run(
            "gibbs-fresh-interpreter",
            _python(
                "import sys, torch; from diffusers import DiffusionPipeline\n"
                "p = DiffusionPipeline.from_pretrained(sys.argv[1], trust_remote_code=True)\n"
                "p.set_progress_bar_config(disable=True)\n"
                "out = p(batch_size=1, num_inference_steps=2, output_type='latent')\n"
                "print(type(p).__name__, type(p.scheduler).__name__, tuple(out.images.shape))\n"
            ),
            prepare=_gibbs_pipeline_folder,
        ),
        # test_results_doc::test_benchmark_writes_a_section_into_the_docs_and_it_checks_clean and
        # test_speed_benchmark::test_speed_sections_run_and_print_their_tables[families]: one run for both
        Run(
            "families-section",
            lambda f: [*BENCH, "--section", "families", "--out-dir", str(f / "bench"), *_write_docs(f)],
            {**OFFLINE, **SRC},
            timeout=600,
            prepare=_marked_page,
        ),
        # test_speed_benchmark::test_speed_sections_run_and_print_their_tables[speed]
        Run(
            "speed-section",
            lambda f: [*BENCH, "--section", "speed", "--out-dir", str(f / "bench")],
            {**OFFLINE, **SRC},
            timeout=600,
        ),
        # test_speed_benchmark::test_speed_sections_run_and_print_their_tables[latent]
        Run(
            "latent-section",
            lambda f: [*BENCH, "--section", "latent", "--out-dir", str(f / "bench")],
            {**OFFLINE, **SRC},
            timeout=600,
        ),
    ]
}

_lock = threading.Lock()
_queue: list[Run] = []
_worker: threading.Thread | None = None
_base: Path | None = None


def _folder(run: Run) -> Path:
    global _base
    if run.folder is None:
        if _base is None:
            _base = Path(tempfile.mkdtemp(prefix="mmgibbs-tests-runs-"))
        run.folder = _base / run.name
        run.folder.mkdir()
        if run.prepare is not None:
            run.prepare(run.folder)
    return run.folder


def _execute(run: Run) -> None:
    """Run the command to its end (or its timeout), its output in files: a pipe nobody reads would fill and block."""
    folder = _folder(run)
    env = {**os.environ, **run.env, "HF_MODULES_CACHE": str(folder / "modules")}
    try:
        with open(folder / "stdout", "w+") as out, open(folder / "stderr", "w+") as err:
            run.process = subprocess.Popen(
                run.command(folder),
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                text=True,
                start_new_session=True,  # its own process group: a kill reaches the processes it launched
            )
            try:
                code = run.process.wait(timeout=run.timeout)
            except subprocess.TimeoutExpired:
                _kill(run.process)
                raise
            out.seek(0)
            err.seek(0)
            run.outcome = subprocess.CompletedProcess(run.process.args, code, out.read(), err.read())
    except BaseException as error:  # re-raised in the test that asks for the run
        run.outcome = error
    finally:
        run.state = "done"
        run.done.set()


def _kill(process: subprocess.Popen[str]) -> None:
    """Kill the run's process group (the command and what it launched) and reap the command."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _work() -> None:
    while True:
        with _lock:
            if not _queue:
                return
            run = _queue.pop(0)
            run.state = "running"
        _execute(run)


def start(names: list[str]) -> None:
    """Prepare the runs ``names`` (in this thread) and run them one by one, in this order, in a worker thread."""
    global _worker
    runs = []
    for run in (RUNS[name] for name in dict.fromkeys(names)):
        if run.state != "new":
            continue
        try:
            _folder(run)
        except Exception as error:  # a failing prepare fails the tests of the run, not the session
            run.outcome, run.state = error, "done"
            run.done.set()
            continue
        run.state = "queued"
        runs.append(run)
    with _lock:
        _queue.extend(runs)
    _worker = threading.Thread(target=_work, name="background-runs", daemon=True)
    _worker.start()


def result(name: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    """The finished run ``name`` and its folder: waits for it, or runs it now if its turn has not come."""
    run = RUNS[name]
    with _lock:
        now = run.state in ("new", "queued")
        if now:
            if run in _queue:
                _queue.remove(run)
            run.state = "running"
    if now:
        _execute(run)
    run.done.wait()
    if isinstance(run.outcome, BaseException):
        raise run.outcome
    assert run.outcome is not None and run.folder is not None
    return run.outcome, run.folder


def stop() -> None:
    """End of the session: nothing more starts, a run still going is killed, the folders are removed."""
    with _lock:
        _queue.clear()
    for run in RUNS.values():
        if run.process is not None and run.process.poll() is None:
            _kill(run.process)
    if _worker is not None:
        _worker.join(timeout=30)
    if _base is not None:
        shutil.rmtree(_base, ignore_errors=True)
