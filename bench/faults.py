"""The long fault campaign against the real CLI: what the store promises under kill -9, racing
writers, flipped bytes, deleted chunks, a full disk and a read-only file system, measured.

Every trial runs `python -m kvdistill.cli ...` as a subprocess (unless said otherwise below) on
tiny models and synthetic data built here (a BPE tokenizer trained on the data, random-init
Qwen2 / Llama checkpoints; nothing is downloaded), and records its outcome:

  1 kill -9     an uninterrupted `kvdistill dump` is timed, then SIGKILLed at --kills offsets
                (stratified uniform over its wall time: start-up, model load, forward, writes,
                commit) and re-run: the rerun exits 0, the shard is byte-equal (every file) to
                the uninterrupted one and no .partial/ is left.
  2 race        two `kvdistill dump` of one (teacher, shard) (--race-samples of the data, so the
                two share 2 cores in ~15 s), started 0-2 s apart (seeded), --races times with
                --on-busy fail (exit codes {0,0} or {0,6}, the 6 one line naming the owner's pid
                and host) and --races times with wait ({0,0}); the committed shard finalizes,
                verifies (in process: store.finalize, store.verify.verify), is byte-equal to an
                uninterrupted dump of the same command, and no .partial/ is left.
  3 corruption  --flips trials over finalized stores (2 teachers x 2 shards) of zarr float16 /
                bfloat16 / int8 / int4 and webdataset float16, in turn: 1-4 random bytes XORed
                at random offsets of a random chunk file (zarr: teachers/*/shard-*/<array>/c/...;
                webdataset: the shard tars; every other trial picks the file under a random byte
                of the shard data instead, which is mostly K / V), then `kvdistill store verify` must exit 4 naming the
                shard and `kvdistill train` for one epoch must exit 4 with one stderr line naming
                it. verify is a subprocess; train runs `kvdistill.cli.main(argv)` in one spawned
                child that serves every trial (stdout / stderr captured at the file-descriptor
                level), because a train subprocess spends ~7 s importing on 2 cores. Then
                --deletes trials (one per store) delete a random chunk file: verify and train
                (both subprocesses) exit 4 naming it. A control runs both on each clean store
                (exit 0).
  4 disk full   (root, tmpfs) `kvdistill dump` into a store on a tmpfs of 30 / 60 / 90 % of the
                shard's size exits 5 with one line, leaves no shard visible (`kvdistill store
                inspect --json`, the teachers folder) and, the tmpfs remounted bigger, the
                same command completes byte-equal.
  5 read-only   (root, tmpfs) finalized zarr and webdataset stores on a tmpfs remounted ro:
                `store inspect`, `store verify`, `train` (run dir elsewhere) exit 0; `store
                finalize` and a dump of a new teacher's shard exit 5 with one line.
  M metadata    finalized zarr / webdataset stores with 1-4 bytes of index.parquet flipped:
                `store verify` and `train` exit 4 naming index.parquet (train: one line); and a
                zarr.json inside a shard truncated: `store verify` exits 4 naming it.

    python bench/faults.py                      # the full campaign (~15-25 min on 2 cores)
    python bench/faults.py --quick --cases 1,3  # a smoke run

Prints a table (case, trials, expected, passed, notes), then the failed trials with their
stderr tails; exits 1 if any trial failed. Cases 4 and 5 are skipped, saying why, when not
root or when tmpfs cannot be mounted. Every subprocess runs with OMP_NUM_THREADS=1.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import multiprocessing as mp
import os
import platform
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager, redirect_stdout, suppress
from dataclasses import dataclass, field
from pathlib import Path

os.environ["OMP_NUM_THREADS"] = "1"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.pop("KVDISTILL_DEBUG", None)  # the CLI's one-line errors are what is measured

TEACHER = "big"  # cases 1, 2, 4: one teacher, one shard, long enough to be killed mid-write
SMALL = ["teacher-a", "teacher-b"]  # cases 3, 5: two teachers of other geometries, 2 shards
VARIANTS = [("zarr", "float16"), ("zarr", "bfloat16"), ("zarr", "int8"), ("zarr", "int4"), ("webdataset", "float16")]
SMALL_SAMPLES, TRAIN_BATCH = 48, 16


# --- running the CLI --------------------------------------------------------------------------


def command(*args) -> list[str]:
    return [sys.executable, "-m", "kvdistill.cli", *map(str, args)]


def cli(*args, timeout: float = 600) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(command(*args), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        return subprocess.CompletedProcess(
            e.cmd, -1, _text(e.stdout), _text(e.stderr) + f"\n[bench: timed out after {timeout:.0f} s]"
        )


def _text(b) -> str:
    return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")


def one_line(err: str) -> bool:
    """The CLI's promise for an expected failure: exactly one line on stderr, no traceback."""
    s = err.strip()
    return bool(s) and "\n" not in s and "Traceback" not in s


def tail(text: str, n: int = 1200) -> str:
    text = text.strip()
    return text if len(text) <= n else "..." + text[-n:]


def shown(cmd) -> str:
    return " ".join(str(c) for c in cmd[2:]) if cmd and cmd[0] == sys.executable else " ".join(map(str, cmd))


class InProcess:
    """A spawned child that runs `kvdistill.cli.main(argv)` per request and returns (exit code,
    stderr): the CLI's code path (the one-line errors and exit codes of `main`) without paying
    the ~7 s import per run. Restarted when it dies or times out."""

    def __init__(self) -> None:
        self.ctx = mp.get_context("spawn")
        self._start()

    def _start(self) -> None:
        self.conn, child = self.ctx.Pipe()
        self.proc = self.ctx.Process(target=_serve, args=(child,), daemon=True)
        self.proc.start()

    def run(self, argv: list[str], timeout: float = 600) -> tuple[int | None, str]:
        self.conn.send([str(a) for a in argv])
        if not self.conn.poll(timeout):
            self.proc.kill()
            self.proc.join()
            self._start()
            return None, f"[bench: in-process run timed out after {timeout:.0f} s]"
        try:
            return self.conn.recv()
        except EOFError:
            self.proc.join()
            code = self.proc.exitcode
            self._start()
            return code, f"[bench: the in-process child died with exit code {code}]"

    def close(self) -> None:
        if self.proc.is_alive():
            self.conn.send(None)
            self.proc.join(30)
        if self.proc.is_alive():
            self.proc.kill()


def _serve(conn) -> None:
    import torch

    torch.set_num_threads(1)
    from kvdistill.cli import main

    while (argv := conn.recv()) is not None:
        conn.send(_captured(main, argv))


def _captured(main, argv: list[str]) -> tuple[int, str]:
    """main(argv) with fds 1 and 2 redirected (what a terminal would show, logging included)."""
    import traceback

    with tempfile.TemporaryFile() as err, open(os.devnull, "wb") as null:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        os.dup2(null.fileno(), 1)
        os.dup2(err.fileno(), 2)
        try:
            code = main(argv)
        except SystemExit as e:  # argparse
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:  # a bug: Python would print the traceback and exit 1
            traceback.print_exc()
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
        err.seek(0)
        return int(code), err.read().decode(errors="replace")


# --- results ----------------------------------------------------------------------------------


@dataclass
class Trial:
    what: str  # what was done
    ok: bool
    got: str  # what was observed
    detail: str = ""  # command, exit code, stderr tail (printed on failure)


@dataclass
class Row:
    case: str
    expected: str
    trials: list[Trial] = field(default_factory=list)
    notes: str = ""
    skipped: str | None = None
    example: str = ""  # one stderr line the CLI printed, shown under the table

    def add(self, t: Trial) -> Trial:
        self.trials.append(t)
        print(
            f"  {time.strftime('%H:%M:%S')} [{self.case}] {len(self.trials)}: {t.what} -> {t.got} "
            f" {'ok' if t.ok else 'FAILED'}",
            flush=True,
        )
        return t

    @property
    def passed(self) -> int:
        return sum(t.ok for t in self.trials)


def outcome(r: subprocess.CompletedProcess) -> str:
    return f"`{shown(r.args)}` exit {r.returncode}; stderr: {tail(r.stderr, 600) or '(empty)'}"


# --- the world: tokenizer, models, configs, reference dump, base stores -----------------------


@dataclass
class World:
    root: Path
    samples: int
    big_yaml: Path = None
    small_yaml: dict = field(default_factory=dict)  # backend -> yaml of teacher-a's shard 0
    student: str = ""
    small: list = field(default_factory=list)  # ModelSpec of teacher-a, teacher-b
    _refs: dict = field(default_factory=dict)
    _stores: dict = field(default_factory=dict)

    def build(self) -> None:
        from kvdistill import tiny
        from kvdistill.core.data import load_examples
        from kvdistill.schemas import (
            DEFAULT_TEMPLATE,
            DataSpec,
            DumpConfig,
            ModelSpec,
            SyntheticSpec,
        )

        t0 = time.perf_counter()
        models = self.root / "models"
        rows = load_examples(DataSpec(synthetic=SyntheticSpec(n_train=400, n_test=16, seed=1)))
        tok = tiny.train_tokenizer(tiny.corpus(rows, DEFAULT_TEMPLATE), vocab_size=320)

        def model(name, arch, seed=0, **geom):
            if not (models / name / "config.json").exists():
                tiny.save(tiny.build_model(arch, tok, seed=seed, **geom), tok, models / name)
            return str(models / name)

        # K/V rows of 4 student layers x 8 kv heads x 64 dims: 4 KiB per row in float16, so the
        # writer flushes a zarr shard (16 x 256 rows) every ~70 samples, during the forward.
        big = model(TEACHER, "qwen2", layers=4, hidden=256, heads=8, kv_heads=8, head_dim=64)
        self.student = model("student", "qwen2", seed=1, layers=4, hidden=64, heads=4, kv_heads=2, head_dim=16)
        self.small = [
            ModelSpec(
                name_or_path=model("teacher-a", "qwen2", layers=3, hidden=64, heads=4, kv_heads=2, head_dim=32),
                name="teacher-a",
            ),
            ModelSpec(
                name_or_path=model("teacher-b", "llama", layers=2, hidden=64, heads=4, kv_heads=1, head_dim=16),
                name="teacher-b",
            ),
        ]
        student = ModelSpec(name_or_path=self.student, name="student")
        data = DataSpec(synthetic=SyntheticSpec(n_train=self.samples, n_test=16, seed=0))
        self.big_yaml = DumpConfig(
            teacher=ModelSpec(name_or_path=big, name=TEACHER),
            student=student,
            store=str(self.root / "unused.zarr"),
            data=data,
            num_shards=1,
            batch_size=4,
            device="cpu",
        ).save(self.root / "big.yaml")
        small_data = DataSpec(synthetic=SyntheticSpec(n_train=SMALL_SAMPLES, n_test=16, seed=0))
        for backend in ("zarr", "webdataset"):
            self.small_yaml[backend] = DumpConfig(
                teacher=self.small[0],
                student=student,
                store=str(self.root / "unused.zarr"),
                data=small_data,
                num_shards=2,
                batch_size=8,
                device="cpu",
                backend=backend,
            ).save(self.root / f"small-{backend}.yaml")
        print(f"models and configs in {self.root} ({time.perf_counter() - t0:.0f} s)", flush=True)

    def dump(self, store: Path, *extra, timeout: float = 600) -> subprocess.CompletedProcess:
        return cli("dump", "--config", self.big_yaml, "--store", store, "--no-progress", *extra, timeout=timeout)

    def reference(self, *extra) -> dict:
        """Two uninterrupted dumps of the big shard (with the extra dump flags): its files (they
        must agree: the dump is deterministic), its size, and the wall time of one (start-up to
        exit, the shorter of the two)."""
        key = tuple(map(str, extra))
        if key not in self._refs:
            walls, shards = [], []
            for i in range(2):
                store = self.root / f"reference{'-'.join(('', *key))}-{i}.zarr"
                shutil.rmtree(store, ignore_errors=True)
                t0 = time.perf_counter()
                r = self.dump(store, *extra)
                walls.append(time.perf_counter() - t0)
                if r.returncode != 0:
                    raise SystemExit(f"the uninterrupted reference dump failed: {outcome(r)}")
                shards.append(files(shard_dir(store)))
                shutil.rmtree(store)
            ref = self._refs[key] = {
                "files": shards[0],
                "deterministic": shards[0] == shards[1],
                "wall": min(walls),
                "bytes": sum(len(b) for b in shards[0].values()),
                "summary": r.stdout.strip().splitlines()[-1] if r.stdout.strip() else "",
            }
            print(
                f"reference dump{' ' + ' '.join(key) if key else ''}: {ref['summary']}; wall {walls[0]:.1f} s /"
                f" {walls[1]:.1f} s; shard {ref['bytes'] / 1e6:.1f} MB; the two dumps byte-equal:"
                f" {ref['deterministic']}",
                flush=True,
            )
        return self._refs[key]

    def base_store(self, backend: str, codec: str) -> Path:
        """A finalized store of teacher-a and teacher-b x 2 shards (built in process: it is the
        subject of the trials, not one)."""
        key = (backend, codec)
        if key not in self._stores:
            from kvdistill.jobs import dump_tasks, run_local
            from kvdistill.schemas import DumpConfig
            from kvdistill.store import finalize

            store = self.root / "base" / f"{backend}-{codec}.zarr"
            shutil.rmtree(store, ignore_errors=True)
            base = DumpConfig.load(self.small_yaml[backend])
            base.store, base.kv_dtype = str(store), codec
            with redirect_stdout(io.StringIO()):  # run_local prints a summary per task
                run_local(dump_tasks(base, self.small), progress=False)
            finalize(store)
            self._stores[key] = store
        return self._stores[key]


def files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def shard_dir(store: Path, teacher: str = TEACHER, shard: int = 0) -> Path:
    return store / "teachers" / teacher / f"shard-{shard:05d}"


def compare(got: dict[str, bytes], want: dict[str, bytes]) -> str:
    """'' when byte-equal, else the first difference."""
    if got.keys() != want.keys():
        return (
            f"files differ: missing {sorted(want.keys() - got.keys())[:3]}, extra"
            f" {sorted(got.keys() - want.keys())[:3]}"
        )
    bad = [k for k in want if got[k] != want[k]]
    return f"{len(bad)} file(s) differ, e.g. {bad[0]}" if bad else ""


def left_over(store: Path) -> list[str]:
    p = store / ".partial"
    return sorted(str(x.relative_to(store)) for x in p.rglob("*")) if p.exists() else []


# --- case 1: kill -9 at random moments, then rerun --------------------------------------------


def phase_after_kill(store: Path) -> str:
    """Where the dump was when it died, from what it left on disk."""
    if shard_dir(store).exists():
        return "after its commit"
    attempts = (
        [p for p in (store / ".partial" / TEACHER).glob("shard-00000.*") if p.suffix != ".lock"]
        if store.exists()
        else []
    )
    if attempts:
        chunks = sum(1 for a in attempts for p in a.rglob("*") if p.is_file() and "c" in p.relative_to(a).parts)
        return f"writing ({chunks} chunk files flushed)"
    if (store / "teachers" / TEACHER / "zarr.json").exists():
        return "store metadata written, shard not begun"
    if store.exists():
        return "creating store metadata"
    return "start-up / data / model load"


def case_kill(w: World, n: int, rng: random.Random) -> list[Row]:
    row = Row("1 kill -9 + rerun", "rerun exit 0, shard byte-equal, no .partial")
    ref = w.reference()
    if not ref["deterministic"]:
        row.notes = "two uninterrupted dumps differ: byte-equality cannot be judged"
    T = ref["wall"]  # the faster of two uninterrupted runs: a kill near the end still finds the dump alive
    offsets = [T * (i + rng.random()) / n for i in range(n)]  # stratified: every part of the run is hit
    rng.shuffle(offsets)
    phases: dict[str, int] = {}
    for i, at in enumerate(offsets):
        store = w.root / "case1" / f"kill-{i:02d}.zarr"
        shutil.rmtree(store, ignore_errors=True)
        store.parent.mkdir(parents=True, exist_ok=True)
        cmd = command("dump", "--config", w.big_yaml, "--store", store, "--no-progress")
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(max(0.0, t0 + at - time.perf_counter()))
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            p.wait()
            phase = phase_after_kill(store)
            killed = f"SIGKILL at {at:.1f} s of {T:.1f} ({phase})"
        else:
            phase = f"finished (exit {p.returncode}) before the kill"
            killed = f"no kill at {at:.1f} s: {phase}"
        phases[phase.split(" (")[0]] = phases.get(phase.split(" (")[0], 0) + 1
        problems = []
        if shard_dir(store).exists() and (diff := compare(files(shard_dir(store)), ref["files"])):
            problems.append(f"a shard visible right after the kill is not the reference: {diff}")
        r = w.dump(store)
        if r.returncode != 0:
            problems.append(f"rerun exit {r.returncode}")
        elif diff := (
            compare(files(shard_dir(store)), ref["files"]) if shard_dir(store).exists() else "no shard after the rerun"
        ):
            problems.append(diff)
        if left := left_over(store):
            problems.append(f".partial left after success: {left[:3]}")
        got = (
            "; ".join(problems)
            or f"rerun exit 0 ({r.stdout.strip().splitlines()[-1][:40] if r.stdout.strip() else ''}...), byte-equal"
        )
        row.add(Trial(killed, not problems, got, "" if not problems else outcome(r)))
        shutil.rmtree(store, ignore_errors=True)
    m = re.search(
        r"in ([\d.]+)s .*\[([^;\]]*)", ref["summary"]
    )  # the dump's own clock: "in 8.7s ... [load 3.5s, forward ...]"
    split = f" = start-up {T - float(m.group(1)):.1f} s + {m.group(2)}" if m else ""
    row.notes = (row.notes + "; " if row.notes else "") + (
        f"dump of {w.samples} samples, shard {ref['bytes'] / 1e6:.0f} MB, wall {T:.1f} s{split}; killed during: "
        + ", ".join(f"{k} {v}" for k, v in sorted(phases.items(), key=lambda kv: -kv[1]))
    )
    return [row]


# --- case 2: two dumps of one (teacher, shard) ------------------------------------------------


def case_race(w: World, n: int, limit: int, rng: random.Random) -> list[Row]:
    from kvdistill.store import finalize
    from kvdistill.store.verify import verify

    ref = w.reference("--limit", limit)  # shorter than case 1's: two of them share the 2 cores
    host = socket.gethostname()
    rows = []
    for mode in ("fail", "wait"):
        row = Row(
            f"2 race --on-busy {mode}",
            "exit {0,0} or {0,6} (6: one line, pid + host)" if mode == "fail" else "exit {0,0}",
        )
        tally: dict[str, int] = {}
        for i in range(n):
            store = w.root / "case2" / f"{mode}-{i:02d}.zarr"
            shutil.rmtree(store, ignore_errors=True)
            store.parent.mkdir(parents=True, exist_ok=True)
            delays = sorted(rng.uniform(0, 2) for _ in range(2))
            cmd = command(
                "dump", "--config", w.big_yaml, "--store", store, "--no-progress", "--limit", limit, "--on-busy", mode
            )
            t0, procs = time.perf_counter(), []
            for d in delays:
                time.sleep(max(0.0, t0 + d - time.perf_counter()))
                procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
            results = []
            for p in procs:
                try:
                    out, err = p.communicate(timeout=600)
                except subprocess.TimeoutExpired:
                    p.kill()
                    out, err = p.communicate()
                results.append((p.returncode, out, err, p.pid))
            codes = sorted(r[0] for r in results)
            key = "{" + ",".join(map(str, codes)) + "}"
            tally[key] = tally.get(key, 0) + 1
            problems = []
            if mode == "fail" and codes not in ([0, 0], [0, 6]) or mode == "wait" and codes != [0, 0]:
                problems.append(f"exit codes {codes}")
            for code, _, err, pid in results:
                if code == 6:
                    owner = next(r[3] for r in results if r[3] != pid)
                    row.example = row.example or err.strip()
                    if not one_line(err) or f"pid {owner}" not in err or f"host {host}" not in err:
                        problems.append(
                            f"busy message is not one line naming pid {owner} and host {host}: {tail(err, 300)!r}"
                        )
            if shard_dir(store).exists():
                try:
                    finalize(store)
                    if found := verify(store, progress=False):
                        problems.append(f"verify: {found[0]}")
                except Exception as e:  # noqa: BLE001 - reported as the trial's failure
                    problems.append(f"finalize / verify raised {type(e).__name__}: {e}")
                if diff := compare(files(shard_dir(store)), ref["files"]):
                    problems.append(diff)
            else:
                problems.append("no shard committed")
            if left := left_over(store):
                problems.append(f".partial left: {left[:3]}")
            what = f"starts at {delays[0]:.2f} s and {delays[1]:.2f} s"
            detail = " | ".join(
                f"pid {pid} exit {c}; stdout {tail(o, 200)!r}; stderr {tail(e, 500)!r}" for c, o, e, pid in results
            )
            row.add(
                Trial(
                    what,
                    not problems,
                    "; ".join(problems) or f"exit {key}, verified, byte-equal",
                    detail if problems else "",
                )
            )
            shutil.rmtree(store, ignore_errors=True)
        row.notes = f"dump of {limit} samples, wall {ref['wall']:.1f} s alone; exit codes: " + ", ".join(
            f"{k} x{v}" for k, v in sorted(tally.items())
        )
        if not ref["deterministic"]:
            row.notes += "; two uninterrupted dumps differ: byte-equality cannot be judged"
        rows.append(row)
    return rows


# --- case 3: flipped bytes and deleted chunk files --------------------------------------------


def chunk_files(store: Path, backend: str) -> list[Path]:
    if backend == "webdataset":
        return sorted((store / "teachers").glob("*/shard-*.tar"))
    return sorted(p for p in (store / "teachers").glob("*/shard-*/*/c/**/*") if p.is_file())


def names_shard(text: str, teacher: str, shard: str) -> bool:
    return f"teacher '{teacher}'" in text and shard in text


def case_corrupt(w: World, n_flip: int, n_delete: int, rng: random.Random) -> list[Row]:
    steps = math.ceil(2 * (SMALL_SAMPLES // 2) / TRAIN_BATCH) + 1  # one epoch (+1 step) of both shards
    labels = [f"{b} {c}" for b, c in VARIANTS]
    flips = {
        (v, check): Row(f"3 flip {v}: {check}", "exit 4, names the shard" + (", one line" if check == "train" else ""))
        for v in labels
        for check in ("verify", "train")
    }
    deletes = {
        check: Row(f"3 delete chunk: {check}", "exit 4, names the file" + (", one line" if check == "train" else ""))
        for check in ("verify", "train")
    }
    control = Row("3 control: clean stores", "verify 0, train 0")
    bases = {label: w.base_store(*v) for label, v in zip(labels, VARIANTS, strict=True)}
    child = InProcess()
    work = w.root / "case3"

    def train_argv(store: Path, run: Path) -> list[str]:
        return [
            "train",
            "--store",
            store,
            "--student",
            w.student,
            "--out",
            run,
            "--max-steps",
            steps,
            "--per-device-train-batch-size",
            TRAIN_BATCH,
            "--device",
            "cpu",
            "--no-progress",
        ]

    try:
        for label, base in bases.items():  # the controls: a clean store passes both
            v = subprocess.Popen(
                command("store", "verify", base, "--no-progress"),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            shutil.rmtree(work / "run", ignore_errors=True)
            code, err = child.run(train_argv(base, work / "run"))
            out, verr = v.communicate(timeout=600)
            control.add(
                Trial(
                    f"{label}: verify",
                    v.returncode == 0,
                    f"exit {v.returncode}",
                    f"stdout {tail(out, 400)}; stderr {tail(verr)}",
                )
            )
            control.add(Trial(f"{label}: train (in process)", code == 0, f"exit {code}", tail(err)))
        per_backend = {"verify": {}, "train": {}}
        hit: dict[str, dict[str, int]] = {}  # variant -> array -> flipped files
        for i in range(n_flip + n_delete):
            delete = i >= n_flip
            label = labels[i % len(labels)]
            backend = VARIANTS[i % len(labels)][0]
            store = work / f"trial-{i:02d}.zarr"
            shutil.rmtree(store, ignore_errors=True)
            shutil.copytree(bases[label], store)
            candidates = chunk_files(store, backend)
            if delete or i % 2 == 0:  # a random file ...
                f = rng.choice(candidates)
            else:  # ... or the file under a random byte of the shard data (mostly K / V)
                f = rng.choices(candidates, weights=[c.stat().st_size for c in candidates])[0]
            teacher, shard = f.relative_to(store / "teachers").parts[:2]
            shard = shard.removesuffix(".tar")
            rel = f.relative_to(store / "teachers")
            if delete:
                f.unlink()
                what = f"{label}: deleted {rel}"
                # the file as a reader can name it: zarr, the array and the chunk key; webdataset, the tar
                name_parts = (
                    [f.name]
                    if backend == "webdataset"
                    else [rel.parts[2], str(f.relative_to(store / "teachers" / teacher / shard / rel.parts[2]))]
                )
            else:
                raw = bytearray(f.read_bytes())
                at = sorted(rng.sample(range(len(raw)), min(len(raw), rng.randint(1, 4))))
                for a in at:
                    raw[a] ^= rng.randint(1, 255)
                f.write_bytes(bytes(raw))
                what = f"{label}: {len(at)} byte(s) flipped at {at} of {rel} ({len(raw):,} B)"
                name_parts = []
                array = "tar" if backend == "webdataset" else rel.parts[2]
                hit.setdefault(label, {})[array] = hit.setdefault(label, {}).get(array, 0) + 1
            v = subprocess.Popen(
                command("store", "verify", store, "--no-progress"),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            run = work / f"run-{i:02d}"
            if delete:  # the deletions: train as a real subprocess too
                r = cli(*train_argv(store, run))
                code, err = r.returncode, r.stderr
            else:
                code, err = child.run(train_argv(store, run))
            try:
                out, verr = v.communicate(timeout=600)
            except subprocess.TimeoutExpired:
                v.kill()
                out, verr = v.communicate()
            said = out + verr
            v_ok = v.returncode == 4 and names_shard(said, teacher, shard) and all(p in said for p in name_parts)
            t_ok = (
                code == 4 and one_line(err) and names_shard(err, teacher, shard) and all(p in err for p in name_parts)
            )
            v_row = deletes["verify"] if delete else flips[(label, "verify")]
            t_row = deletes["train"] if delete else flips[(label, "train")]
            v_row.add(
                Trial(what, v_ok, f"verify exit {v.returncode}", f"stdout {tail(out, 600)}; stderr {tail(verr, 400)}")
            )
            if code == 4 and not t_row.example and (delete or "/k/" in str(rel) or "/v/" in str(rel)):
                t_row.example = err.strip()
            if v.returncode == 4 and not v_row.example and delete:
                v_row.example = next((line.strip() for line in out.splitlines() if "missing" in line), "")
            t_row.add(
                Trial(what, t_ok, f"train exit {code}{'' if one_line(err) else ' (stderr not one line)'}", tail(err))
            )
            if delete:
                for check, ok in (("verify", v_ok), ("train", t_ok)):
                    tally = per_backend[check].setdefault(label, [0, 0])
                    tally[0] += ok
                    tally[1] += 1
            shutil.rmtree(store, ignore_errors=True)
            shutil.rmtree(run, ignore_errors=True)
    finally:
        child.close()
    for (label, check), row in flips.items():
        arrays = ", ".join(f"{a} {k}" for a, k in sorted(hit.get(label, {}).items(), key=lambda x: -x[1]))
        row.notes = (
            f"files hit: {arrays}"
            if check == "verify"
            else (
                f"kvdistill.cli.main in a spawned child, {steps} steps x {TRAIN_BATCH} (> 1 epoch of {SMALL_SAMPLES})"
            )
        )
    for check, row in deletes.items():
        row.notes = "subprocess; " + ", ".join(f"{k} {a}/{b}" for k, (a, b) in per_backend[check].items())
    control.notes = "train in process"
    return [control, *flips.values(), *deletes.values()]


# --- case M: the store's metadata files ------------------------------------------------------


def case_metadata(w: World, n: int, rng: random.Random) -> list[Row]:
    """Case M, over the finalized zarr float16 and webdataset float16 stores in turn: 1-4 random
    bytes of index.parquet XORed, then `store verify` (subprocess) and `train` (in process, as in
    case 3) must exit 4 naming index.parquet (train: one line); and, zarr only, one zarr.json inside
    a shard (the shard's record or an array's metadata) truncated to a random length, then
    `store verify` must exit 4 naming that file."""
    labels = [("zarr", "float16"), ("webdataset", "float16")]
    bases = {v: w.base_store(*v) for v in labels}
    flip_v = Row("M flip index.parquet: verify", "exit 4, names index.parquet")
    flip_t = Row("M flip index.parquet: train", "exit 4, one line, names index.parquet")
    trunc = Row("M truncate a shard's zarr.json: verify", "exit 4, names the file")
    child = InProcess()
    work = w.root / "caseM"
    steps = math.ceil(2 * (SMALL_SAMPLES // 2) / TRAIN_BATCH) + 1
    decoded = 0

    def verify(store: Path) -> tuple[int, str]:
        r = cli("store", "verify", store, "--no-progress")
        return r.returncode, r.stdout + r.stderr

    try:
        for i in range(n):
            backend, codec = labels[i % len(labels)]
            store = work / f"trial-{i:02d}.zarr"
            shutil.rmtree(store, ignore_errors=True)
            shutil.copytree(bases[(backend, codec)], store)
            f = store / "index.parquet"
            raw = bytearray(f.read_bytes())
            at = sorted(rng.sample(range(len(raw)), rng.randint(1, 4)))
            for a in at:
                raw[a] ^= rng.randint(1, 255)
            f.write_bytes(bytes(raw))
            try:  # does it still decode (so only its checksum tells)?
                import pyarrow as pa
                import pyarrow.parquet as pq

                pq.ParquetFile(pa.BufferReader(bytes(raw))).read().to_pylist()
                decoded += 1
                kind = "decodes"
            except Exception:  # noqa: BLE001 - any failure to decode
                kind = "does not decode"
            what = f"{backend}: {len(at)} byte(s) flipped at {at} of index.parquet ({len(raw):,} B; {kind})"
            code, said = verify(store)
            flip_v.add(
                Trial(
                    what,
                    code == 4 and "index.parquet" in said and "Traceback" not in said,
                    f"verify exit {code}",
                    tail(said),
                )
            )
            run = work / f"run-{i:02d}"
            code, err = child.run(
                [
                    "train",
                    "--store",
                    store,
                    "--student",
                    w.student,
                    "--out",
                    run,
                    "--max-steps",
                    steps,
                    "--per-device-train-batch-size",
                    TRAIN_BATCH,
                    "--device",
                    "cpu",
                    "--no-progress",
                ]
            )
            ok = code == 4 and one_line(err) and "index.parquet" in err
            flip_t.add(
                Trial(what, ok, f"train exit {code}{'' if one_line(err) else ' (stderr not one line)'}", tail(err))
            )
            if ok and not flip_t.example:
                flip_t.example = err.strip()
            shutil.rmtree(run, ignore_errors=True)
            if backend == "zarr":
                shutil.rmtree(store)
                shutil.copytree(bases[(backend, codec)], store)
                g = rng.choice(sorted((store / "teachers").glob("*/shard-*/**/zarr.json")))
                text = g.read_bytes()
                g.write_bytes(text[: rng.randrange(len(text))])
                rel = g.relative_to(store)
                code, said = verify(store)
                trunc.add(
                    Trial(
                        f"{rel} truncated",
                        code == 4 and str(g) in said and "Traceback" not in said,
                        f"verify exit {code}",
                        tail(said),
                    )
                )
            shutil.rmtree(store, ignore_errors=True)
    finally:
        child.close()
    flip_v.notes = (
        f"subprocess; zarr and webdataset stores alternating; {decoded} of {n} flipped files still decode (only the"
        " checksum tells)"
    )
    flip_t.notes = f"in process, {steps} steps x {TRAIN_BATCH}"
    trunc.notes = "subprocess; the zarr float16 store; a random zarr.json under teachers/*/shard-*/"
    return [flip_v, flip_t, trunc]


# --- cases 4, 5: a full disk, a read-only store (root, tmpfs) ---------------------------------


class NoMount(Exception):
    pass


@contextmanager
def tmpfs(path: Path, size: int):
    """A tmpfs of `size` bytes at `path`, always unmounted again."""
    if os.geteuid() != 0:
        raise NoMount(f"not root (euid {os.geteuid()}): cannot mount a tmpfs")
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={max(size, 1 << 20) // 1024}k", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if r.returncode:
        raise NoMount(f"`mount -t tmpfs` failed: {r.stderr.strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def remount(path: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(path)], check=True, capture_output=True)


def empty(path: Path) -> None:
    for p in path.iterdir():
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def case_disk_full(w: World, fractions: list[float]) -> list[Row]:
    row = Row("4 disk full", "exit 5, one line, no shard visible; rerun after space: exit 0, byte-equal")
    ref = w.reference()
    mnt = w.root / "case4-tmpfs"
    size = ref["bytes"]
    try:
        with tmpfs(mnt, int(size * fractions[0])):
            for frac in fractions:
                empty(mnt)
                remount(mnt, f"size={int(size * frac) // 1024}k")
                store = mnt / "store.zarr"
                r = w.dump(store)
                problems = []
                if r.returncode != 5 or not one_line(r.stderr) or "disk full" not in r.stderr:
                    problems.append(
                        f"exit {r.returncode}, stderr {'one line' if one_line(r.stderr) else 'NOT one line'}"
                    )
                if shard_dir(store).exists():
                    problems.append("a shard is visible")
                seen = "no store"
                if (store / "zarr.json").exists():
                    ins = cli("store", "inspect", store, "--json")
                    if ins.returncode == 0:
                        t = json.loads(ins.stdout)["teachers"].get(TEACHER, {})
                        seen = f"inspect: {t.get('shards_complete', 0)} complete, {t.get('shards_partial', 0)} partial"
                        if t.get("shards_complete", 0):
                            problems.append(seen)
                    else:
                        problems.append(f"store inspect exit {ins.returncode}: {tail(ins.stderr, 300)}")
                left = left_over(store)
                failed = outcome(r)
                remount(mnt, f"size={(2 * size + (64 << 20)) // 1024}k")
                r2 = w.dump(store)
                if r2.returncode != 0:
                    problems.append(f"rerun exit {r2.returncode}")
                elif diff := compare(files(shard_dir(store)), ref["files"]):
                    problems.append(f"rerun: {diff}")
                if left2 := left_over(store):
                    problems.append(f".partial left after the rerun: {left2[:3]}")
                got = "; ".join(problems) or (
                    f'exit 5 "{tail(r.stderr, 140)}"; {seen}; {len(left)} .partial entries; rerun exit 0, byte-equal'
                )
                row.example = row.example or r.stderr.strip()
                row.add(
                    Trial(
                        f"tmpfs {frac:.0%} of the shard ({int(size * frac) / 1e6:.0f} MB)",
                        not problems,
                        got,
                        f"{failed} || rerun: {outcome(r2)}" if problems else "",
                    )
                )
    except NoMount as e:
        row.skipped = str(e)
    return [row]


def case_train(w: World, fractions: list[float], races: int) -> list[Row]:
    """The trainer's own faults: a full disk under --out while it saves (checkpoint or final
    model), and two runs started on one --out at once."""
    full = Row("T train disk full", "exit 5, one line naming the folder, no partial left; resume after space: exit 0")
    race = Row("T two trains, one --out", "exit {0,6} (6: one line naming the owner) or {0,0} (one after the other)")
    store = w.base_store("zarr", "float16")

    def train(out: Path, *extra) -> subprocess.CompletedProcess:
        return cli(
            "train",
            "--store",
            store,
            "--student",
            w.student,
            "--out",
            out,
            "--batch-size",
            "8",
            "--max-steps",
            "2",
            "--device",
            "cpu",
            "--no-progress",
            *extra,
        )

    ref = w.root / "case-T-ref"
    shutil.rmtree(ref, ignore_errors=True)
    r = train(ref, "--save-every", "1")
    if r.returncode:
        raise SystemExit(f"the reference training run failed: {outcome(r)}")
    size = sum(p.stat().st_size for p in (ref / "checkpoints" / "step-0000001").rglob("*") if p.is_file())
    mnt = w.root / "case-T-tmpfs"
    try:
        with tmpfs(mnt, int(size * fractions[0])):
            for frac in fractions:
                empty(mnt)
                remount(mnt, f"size={int(size * frac) // 1024}k")
                r = train(mnt / "run", "--save-every", "1")
                problems = []
                if r.returncode != 5 or not one_line(r.stderr) or "disk full at" not in r.stderr:
                    problems.append(
                        f"exit {r.returncode}, stderr {'one line' if one_line(r.stderr) else 'NOT one line'}"
                    )
                ckpts = mnt / "run" / "checkpoints"
                partial = [p.name for p in ckpts.iterdir() if p.name.startswith(".")] if ckpts.exists() else []
                if partial or (mnt / "run" / ".final.partial").exists():
                    problems.append(f"partial left: {partial}")
                remount(mnt, f"size={(8 * size + (64 << 20)) // 1024}k")
                r2 = train(mnt / "run", "--save-every", "1", "--resume", "auto")
                if r2.returncode:
                    problems.append(f"resume exit {r2.returncode}")
                full.example = full.example or r.stderr.strip()
                full.add(
                    Trial(
                        f"tmpfs {frac:.0%} of a checkpoint ({int(size * frac) / 1e6:.1f} MB)",
                        not problems,
                        "; ".join(problems) or f'exit 5 "{tail(r.stderr, 140)}"; no partial; resume exit 0',
                        outcome(r) if problems else "",
                    )
                )
    except NoMount as e:
        full.skipped = str(e)
    for i in range(races):
        out = w.root / f"case-T-race-{i}"
        shutil.rmtree(out, ignore_errors=True)
        procs = [
            subprocess.Popen(
                [
                    str(c)
                    for c in command(
                        "train",
                        "--store",
                        store,
                        "--student",
                        w.student,
                        "--out",
                        out,
                        "--batch-size",
                        "8",
                        "--max-steps",
                        "4",
                        "--device",
                        "cpu",
                        "--no-progress",
                    )
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            for _ in range(2)
        ]
        got = [(p.wait(timeout=600), _text(p.stderr.read())) for p in procs]
        codes = sorted(c for c, _ in got)
        busy = [e for c, e in got if c == 6]
        ok = codes in ([0, 0], [0, 6]) and all(one_line(e) and "is being written by" in e for e in busy)
        race.example = race.example or (busy[0].strip() if busy else "")
        race.add(
            Trial(f"race {i + 1}", ok, f"exit codes {codes}", "" if ok else "; ".join(tail(e, 300) for _, e in got))
        )
    return [full, race]


def case_read_only(w: World) -> list[Row]:
    rows = {
        k: Row(f"5 read-only: {k}", e)
        for k, e in (("read", "inspect, verify, train: exit 0"), ("write", "finalize, dump: exit 5, one line"))
    }
    mnt = w.root / "case5-tmpfs"
    stores = {backend: w.base_store(backend, "float16") for backend in ("zarr", "webdataset")}
    size = sum(sum(f.stat().st_size for f in s.rglob("*") if f.is_file()) for s in stores.values()) + (16 << 20)
    try:
        with tmpfs(mnt, size):
            for base in stores.values():
                shutil.copytree(base, mnt / base.name)
            remount(mnt, "ro")
            for backend, base in stores.items():
                store = mnt / base.name
                run = w.root / "case5-runs" / backend
                shutil.rmtree(run, ignore_errors=True)
                reads = [
                    ("store", "inspect", store),
                    ("store", "verify", store, "--no-progress"),
                    (
                        "train",
                        "--store",
                        store,
                        "--student",
                        w.student,
                        "--out",
                        run,
                        "--max-steps",
                        3,
                        "--per-device-train-batch-size",
                        TRAIN_BATCH,
                        "--device",
                        "cpu",
                        "--no-progress",
                    ),
                ]
                for args in reads:
                    r = cli(*args)
                    rows["read"].add(
                        Trial(
                            f"{backend}: {' '.join(map(str, args[:2]))}",
                            r.returncode == 0,
                            f"exit {r.returncode}",
                            outcome(r),
                        )
                    )
                writes = [
                    ("store", "finalize", store),
                    (
                        "dump",
                        "--config",
                        w.small_yaml[backend],
                        "--store",
                        store,
                        "--teacher-name",
                        "teacher-new",
                        "--no-progress",
                    ),
                ]
                for args in writes:
                    r = cli(*args)
                    ok = r.returncode == 5 and one_line(r.stderr) and "read-only" in r.stderr
                    rows["write"].example += f"{'' if not rows['write'].example else chr(10)}{r.stderr.strip()}"
                    rows["write"].add(
                        Trial(
                            f"{backend}: {' '.join(map(str, args[:2]))}",
                            ok,
                            f"exit {r.returncode}: {tail(r.stderr, 160)}",
                            outcome(r),
                        )
                    )
    except NoMount as e:
        for row in rows.values():
            row.skipped = str(e)
    return list(rows.values())


# --- the table --------------------------------------------------------------------------------


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with suppress(OSError, StopIteration):
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent,
    ).stdout.strip()
    import kvdistill

    package = Path(kvdistill.__file__).resolve().parent
    source = (
        "" if package.is_relative_to(Path(__file__).resolve().parents[1]) else f", kvdistill imported from {package}"
    )
    return (
        f"{time.strftime('%Y-%m-%d %H:%M %Z')}, {os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, "
        f"commit {commit}{' + uncommitted changes' if dirty else ''}{source}"
    )


def print_table(rows: list[Row]) -> None:
    table = [("case", "trials", "expected", "passed", "notes")]
    for r in rows:
        if r.skipped:
            table.append((r.case, "0", r.expected, "skipped", r.skipped))
        else:
            table.append((r.case, str(len(r.trials)), r.expected, f"{r.passed}/{len(r.trials)}", r.notes))
    widths = [max(len(t[i]) for t in table) for i in range(4)]
    for i, t in enumerate(table):
        print("  ".join(c.ljust(widths[j]) if j < 4 else c for j, c in enumerate(t)).rstrip())
        if i == 0:
            print("  ".join("-" * wd for wd in widths) + "  -----")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", type=Path, default=None, help="work folder to keep (default: a temp dir, removed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a smoke run: few trials per case")
    p.add_argument(
        "--cases",
        default="1,2,3,4,5,T,M",
        help=(
            "comma-separated subset of 1,2,3,4,5,T,M (T: the trainer's disk full and run-directory race; M:"
            " index.parquet and shard metadata damaged)"
        ),
    )
    p.add_argument("--samples", type=int, default=150, help="samples of the big dump (cases 1, 2, 4)")
    p.add_argument("--kills", type=int, default=None, help="case 1 trials (default 20; --quick 3)")
    p.add_argument("--races", type=int, default=None, help="case 2 trials per --on-busy mode (default 10; --quick 2)")
    p.add_argument("--flips", type=int, default=None, help="case 3 byte-flip trials (default 50; --quick 5)")
    p.add_argument(
        "--deletes", type=int, default=None, help="case 3 deleted-chunk trials (default 5: one per store; --quick 5)"
    )
    p.add_argument("--race-samples", type=int, default=60, help="samples of case 2's dumps (--limit)")
    p.add_argument("--meta", type=int, default=None, help="case M trials (default 20; --quick 4)")
    args = p.parse_args()
    cases = {c.strip() for c in args.cases.split(",") if c.strip()}
    if cases - set("12345TM"):
        p.error(f"unknown case(s) {sorted(cases - set('12345TM'))}; choose from 1,2,3,4,5,T,M")
    quick = args.quick
    kills = args.kills or (3 if quick else 20)
    races = args.races or (2 if quick else 10)
    flips = args.flips if args.flips is not None else (5 if quick else 50)
    deletes = args.deletes if args.deletes is not None else 5

    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(1)
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    where = machine()
    print(
        f"kvdistill fault campaign: {where}; seed {args.seed}; cases"
        f" {','.join(sorted(cases))}{' (quick)' if quick else ''}",
        flush=True,
    )
    root = args.dir or Path(tempfile.mkdtemp(prefix="kvdistill-bench-faults-"))
    root.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    rows: list[Row] = []
    seconds: dict[str, float] = {}
    try:
        w = World(root.absolute(), args.samples)
        w.build()
        plan = [
            ("1", lambda: case_kill(w, kills, random.Random(args.seed * 1000 + 1))),
            ("2", lambda: case_race(w, races, args.race_samples, random.Random(args.seed * 1000 + 2))),
            ("3", lambda: case_corrupt(w, flips, deletes, random.Random(args.seed * 1000 + 3))),
            ("4", lambda: case_disk_full(w, [0.3, 0.6, 0.9] if not quick else [0.6])),
            ("5", lambda: case_read_only(w)),
            ("T", lambda: case_train(w, [0.3, 0.9] if not quick else [0.5], 2 if quick else 5)),
            ("M", lambda: case_metadata(w, args.meta or (4 if quick else 20), random.Random(args.seed * 1000 + 7))),
        ]
        for key, run in plan:
            if key in cases:
                print(f"\ncase {key}", flush=True)
                t0 = time.perf_counter()
                rows += run()
                seconds[key] = time.perf_counter() - t0
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    total = time.perf_counter() - t_start
    print(
        f"\n{where}; seed {args.seed}; total {total / 60:.1f} min ("
        + ", ".join(f"case {k} {v:.0f} s" for k, v in seconds.items())
        + ")\n"
    )
    print_table(rows)
    examples = [(r.case, line) for r in rows for line in r.example.splitlines() if line.strip()]
    if examples:
        print("\nwhat the CLI said (examples from this run):")
        for case, line in examples:
            print(f"  [{case}] {line}")
    failed = [(r, t) for r in rows for t in r.trials if not t.ok]
    if failed:
        print(f"\n{len(failed)} failed trial(s):")
        for r, t in failed:
            print(f"- [{r.case}] {t.what}\n    got: {t.got}\n    {t.detail}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
