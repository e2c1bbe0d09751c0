"""The study database: storage, study-level attributes, baseline enqueueing, crash recovery.

The study is an ordinary Optuna study in Optuna's RDB schema (SQLite by default, any SQLAlchemy URL
otherwise) or a journal file, so `optuna.load_study` and optuna-dashboard open it. Only driver processes
write it: one on a SQLite file, several on a journal file or a PostgreSQL database.

What the tuner adds lives in Optuna's own attribute tables: per trial (user attrs) the role, the full
config, throughput and its spread, kNN before and after, speedup, phase times, peak memory, the
hardware, and for unfinished trials `fail_reason` or `pruned_phase`/`prune_reason`; per study the
search-space fingerprint, the hardware, the baseline's numbers and the kNN noise.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import platform
import time
import warnings
import zlib
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy.exc
from optuna.trial import FrozenTrial, TrialState

from trainer.config import ConfigError
from trainer.knobs import flatten
from trainer.measure import cpu_model
from tuner.space import SearchSpace, first_difference

OBJECTIVES = ("throughput_img_s", "knn_top1")
BASELINE_ROLES = ("baseline", "baseline_noise")
#: The positive control (`constraints.knn_control`): the baseline with a change known to harm learning.
CONTROL = "control"
#: Trials that run the baseline's knob values (the control adds its own change on top).
REFERENCE_ROLES = BASELINE_ROLES + (CONTROL,)


#: Optuna's JournalStorage on a file: several drivers on one machine or a shared filesystem.
JOURNAL = "journal:///"


def check_storage_url(url: str, source: str = "--storage") -> None:
    """A one-line `ConfigError` unless `url` is a database URL SQLAlchemy knows, or `journal:///FILE`
    (checked before any connection)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    example = "e.g. sqlite:///studies/speed.db, journal:///studies/speed.log or postgresql://user:password@host/db"
    if url.startswith(JOURNAL):
        if not url[len(JOURNAL):].strip():
            raise ConfigError(f"{source} {url!r}: a journal URL names a file, e.g. journal:///studies/speed.log")
        return
    try:
        make_url(url).get_dialect()
    except NoSuchModuleError:  # a subclass of ArgumentError: first
        raise ConfigError(f"{source} {url!r}: unknown database kind {url.split(':', 1)[0]!r} ({example})") from None
    except ArgumentError:
        raise ConfigError(f"{source} {url!r}: not a database URL ({example})") from None


def storage_for(url: str) -> optuna.storages.BaseStorage:
    """The Optuna storage for `url`: a journal file, or an RDB storage (a relative SQLite path gets its folder created).

    A server database that cannot be reached (refused, wrong password, no such database) or whose driver
    package is missing is a one-line `ConfigError`, raised before anything is written."""
    if url.startswith(JOURNAL):
        from optuna.storages.journal import JournalFileBackend

        path = Path(url[len(JOURNAL):])
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    if url.startswith("sqlite:///"):
        path = Path(url[len("sqlite:///"):])
        if str(path) not in ("", ":memory:"):
            path.parent.mkdir(parents=True, exist_ok=True)
    elif not url.startswith("sqlite"):
        _check_server(url)
    kwargs = {"connect_args": {"timeout": 30}} if url.startswith("sqlite") else None
    for attempt in range(5):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.OperationalError, sqlalchemy.exc.ProgrammingError):
            # Two processes opened a new database at once (a driver starting while `tuner status` or a
            # second driver looks): both create Optuna's tables and stamp its schema version, and one
            # loses ("table already exists", a UNIQUE constraint, a deadlock between the two). The
            # winner's schema is complete a moment later; opening again finds it.
            if attempt == 4:
                raise
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


def _check_server(url: str) -> None:
    """Connect to a server database once: a one-line `ConfigError` when it cannot be used (nothing written)."""
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url
    from sqlalchemy.pool import NullPool

    shown = make_url(url).render_as_string(hide_password=True)
    try:
        engine = create_engine(url, poolclass=NullPool)
    except ImportError as exc:
        package = {"psycopg": "'psycopg[binary]'", "psycopg2": "psycopg2-binary"}.get(getattr(exc, "name", None) or "")
        hint = f"; pip install {package}" if package else ""
        raise ConfigError(f"{shown}: its database driver {exc.name or ''} is not installed{hint}") from None
    try:
        with engine.connect():
            pass
    except sqlalchemy.exc.DBAPIError as exc:
        reason = "; ".join(line.strip() for line in str(exc.orig).splitlines() if line.strip())
        raise ConfigError(f"{shown}: cannot open the database: {reason}") from None
    finally:
        engine.dispose()


@contextlib.contextmanager
def driver_lock(url: str, name: str):
    """Hold the one-driver lock of a SQLite study while `tuner run` drives it.

    Two drivers on one SQLite file are not safe: each recovers the other's running trials as
    interrupted, and both enqueue and sample. The second therefore refuses at once, with one line. The
    lock is an advisory `flock` on a file beside the database, released by the kernel however the
    driver ends, so a killed driver never leaves a stale lock. Journal files and server databases are
    made for several drivers and take no lock.
    """
    db = url[len("sqlite:///"):] if url.startswith("sqlite:///") else ""
    if not db or db == ":memory:":
        yield
        return
    path = Path(f"{db}.{name}.lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise ConfigError(
            f"{url}: study {name!r} is being run by another tuner (pid {pid}); a SQLite file takes one driver: wait for "
            f"it, or run several drivers on a journal file (--storage journal:///studies/{name}.log) or a server "
            f"database (--storage postgresql://...)") from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def open_study(space: SearchSpace, url: str) -> optuna.Study:
    """Create the study (baseline trials enqueued first) or continue it; refuse a changed space.

    Several drivers may start at once on a journal file or a server database: one creates the study and
    enqueues the baseline, the others load it and wait until the creator has set it up."""
    sampler, storage = space.build_sampler(), storage_for(url)  # one storage: one connection pool per driver
    if not any(s.study_name == space.name for s in optuna.get_all_study_summaries(storage)):
        try:
            study = optuna.create_study(study_name=space.name, storage=storage, sampler=sampler,
                                        directions=["maximize", "maximize"])
        except optuna.exceptions.DuplicatedStudyError:
            pass  # another driver created it a moment ago: continue it
        else:
            _set_up(study, space)
            return study
    study = optuna.load_study(study_name=space.name, storage=storage, sampler=sampler)
    _await_set_up(study, space)
    stored = study.user_attrs.get("space_fingerprint", {})
    changed = [k for k, v in space.fingerprint().items() if stored.get(k) not in (None, v)]
    if changed:
        old = study.user_attrs.get("space_sections", {}).get(changed[0])
        what = first_difference(old, space.sections()[changed[0]]) if old is not None else None
        raise ConfigError(
            f"{space.source}: {changed[0]}{'.' + what if what else ''}: changed since study {space.name!r} in {url} "
            f"was started; its trials would not be comparable (give the space a new name: or use --storage)")
    return study


def _set_up(study: optuna.Study, space: SearchSpace) -> None:
    """A new study's attributes and baseline trials; the fingerprint last, as the sign that it is complete."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([OBJECTIVES[0], space.constraints.knn_metric])
    study.set_user_attr("space_sections", space.sections())
    study.set_user_attr("space_source", space.source)
    study.set_user_attr("hardware", hardware_fingerprint())
    study.set_user_attr("knn_tolerance_points", space.constraints.knn_tolerance_points)
    study.set_user_attr("knn_backbone", space.constraints.knn_backbone)
    study.set_user_attr("trial_overrides", space.trial.overrides())
    if not any(t.user_attrs.get("role") in BASELINE_ROLES for t in study.get_trials(deepcopy=False)):
        enqueue_baseline(study, space)
    study.set_user_attr("space_fingerprint", space.fingerprint())


def _await_set_up(study: optuna.Study, space: SearchSpace, wait_s: float = 60.0) -> None:
    """Wait while the driver that created the study sets it up; finish the set-up if that driver died doing it."""
    deadline = time.monotonic() + wait_s
    while "space_fingerprint" not in study.user_attrs:
        if time.monotonic() > deadline:
            _set_up(study, space)
            return
        time.sleep(0.2)


def baseline_params(space: SearchSpace) -> dict[str, Any]:
    """The baseline's value of every searched knob: the baseline's own, else the base config's (what the
    baseline runs with), where it lies in the knob's range or choices and the knob's conditions hold.

    Every knob, not only those the baseline names: a model-based sampler (GP) models only the knobs that
    every finished trial carries (Optuna's intersection search space), and draws the rest at random."""
    base = flatten(space.base_config().to_dict())
    params: dict[str, Any] = {}

    def value_of(path: str) -> Any:
        return params[path] if path in params else space.baseline.get(path, base.get(path))

    for name, param in space.params.items():
        value, dist = value_of(name), param.distribution()
        internal = _internal(dist, value)  # NaN: not one of a categorical knob's choices
        conditions_hold = all(c.holds(value_of(c.path)) for c in param.conditions())
        if internal == internal and dist._contains(internal) and conditions_hold:
            params[name] = value
    return params


def _internal(dist: optuna.distributions.BaseDistribution, value: Any) -> float:
    try:
        return dist.to_internal_repr(value)
    except (ValueError, TypeError):
        return float("nan")


def enqueue_baseline(study: optuna.Study, space: SearchSpace) -> None:
    """Baseline first: trial 0 at the base seed, then the same config at other seeds to measure kNN noise."""
    params, seed = baseline_params(space), space.base_config().system.seed
    for i in range(space.constraints.knn_noise_seeds):
        role = "baseline" if i == 0 else "baseline_noise"
        study.enqueue_trial(params, user_attrs={"role": role, "seed": seed + i})
    if space.constraints.knn_control:
        study.enqueue_trial(params, user_attrs={"role": CONTROL, "seed": seed})


def driver_id() -> str:
    """This driver process, as stored on the trials it runs: `host:pid`."""
    return f"{platform.node()}:{os.getpid()}"


def _driver_gone(trial: FrozenTrial) -> bool:
    """Whether the driver that started `trial` is this process or a dead process on this host. A live
    driver's trials (several drivers on one journal file or server database) are never taken over, and
    neither are another host's, whose drivers this one cannot see."""
    owner = trial.user_attrs.get("driver")
    if not owner:
        return True  # written by a version that did not record its driver
    host, _, pid = owner.rpartition(":")
    if owner == driver_id():
        return True
    if host != platform.node() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class StudyLock:
    """The study's lock among several drivers, held while one asks for a trial or recovers others' trials.

    Without it two drivers asking at once both pass the budget check (one trial too many) and a grid
    sampler gives both the same unvisited point; and a driver recovering interrupted trials could take a
    trial another driver has just asked for but not yet marked as its own. PostgreSQL: an advisory lock
    on a connection of its own; a journal file: an `flock` on a file beside it. Both are released however
    the holder ends. A SQLite study has one driver (`driver_lock`); other server databases take no lock.
    Reusable, not reentrant.
    """

    def __init__(self, url: str, name: str):
        self.url, self.name = url, name
        self._release: Any = None

    def __enter__(self) -> "StudyLock":
        if self.url.startswith(JOURNAL):
            fd = os.open(f"{self.url[len(JOURNAL):]}.{self.name}.ask-lock", os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._release = lambda: os.close(fd)  # closing releases the flock
        elif self.url.startswith("postgresql"):
            from sqlalchemy import create_engine, text
            from sqlalchemy.pool import NullPool

            key = zlib.crc32(f"dino-speed-tuner:{self.name}".encode()) - 2**31  # a signed 32-bit key per study
            engine = create_engine(self.url, poolclass=NullPool)
            conn = engine.connect()  # the lock ends with this session, however the driver ends
            conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": key})

            def release() -> None:
                try:
                    conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": key})
                finally:
                    conn.close()
                    engine.dispose()
            self._release = release
        return self

    def __exit__(self, *exc) -> bool:
        release, self._release = self._release, None
        if release is not None:
            release()
        return False


def recover_interrupted(study: optuna.Study, lock: StudyLock | None = None,
                        others_only: bool = False) -> list[int]:
    """Mark trials left RUNNING by a driver that is gone FAIL ("interrupted") and enqueue their configs again.

    `lock`: the study's `StudyLock` (several drivers); `others_only`: leave this driver's own trials alone
    (a running driver taking over a dead driver's trials)."""
    numbers = []
    with lock or contextlib.nullcontext():
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if not _driver_gone(t) or (others_only and t.user_attrs.get("driver") == driver_id()):
                continue
            study._storage.set_trial_user_attr(t._trial_id, "fail_reason", "interrupted")
            study.tell(t.number, state=TrialState.FAIL)
            requeue(study, t)
            numbers.append(t.number)
    return numbers


def requeue(study: optuna.Study, trial) -> None:
    """Enqueue an interrupted trial's params again, keeping its role and seed, marked `rerun_of`."""
    keep = {k: trial.user_attrs[k] for k in ("role", "seed") if k in trial.user_attrs}
    study.enqueue_trial(trial.params, user_attrs={**keep, "rerun_of": trial.number})


def counted_trials(study: optuna.Study) -> list[FrozenTrial]:
    """Finished trials that count towards the budget (an interrupted trial is run again, so it does not)."""
    done = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    return [t for t in study.get_trials(deepcopy=False, states=done)
            if t.user_attrs.get("fail_reason") != "interrupted" and t.user_attrs.get("role") != "rung"]


def control_trial(study: optuna.Study) -> FrozenTrial | None:
    """The completed positive-control trial (`constraints.knn_control`), if the study has one."""
    return next((t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                 if t.user_attrs.get("role") == CONTROL), None)


def baseline_trials(study: optuna.Study) -> list[FrozenTrial]:
    """Completed baseline trials (all seeds), base seed first."""
    trials = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
              if t.user_attrs.get("role") in BASELINE_ROLES and t.user_attrs.get("fail_reason") is None]
    return sorted(trials, key=lambda t: (t.user_attrs.get("role") != "baseline", t.number))


def hardware_fingerprint() -> dict[str, Any]:
    """Device name, CPU model and cores, torch and CUDA versions of this process's machine."""
    import torch

    cuda = torch.cuda.is_available()
    return {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "gpu_count": torch.cuda.device_count() if cuda else 0,
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "host": platform.node(),
    }


def resolve_study(study: str, study_name: str | None = None) -> tuple[str, str]:
    """`STUDY` on the command line: a study name (studies/<name>.db) or a storage URL -> (url, name)."""
    if "://" not in study:
        url = f"sqlite:///studies/{study}.db"
        if not Path(f"studies/{study}.db").exists():
            raise ConfigError(f"no study database studies/{study}.db (give a study name or a storage URL)")
        return url, study_name or study
    check_storage_url(study, "STUDY")
    for prefix in ("sqlite:///", JOURNAL):
        if study.startswith(prefix) and not Path(study[len(prefix):]).exists():
            raise ConfigError(f"{study}: no such {'database' if prefix.startswith('sqlite') else 'journal'} file")
    names = [s.study_name for s in optuna.get_all_study_summaries(storage_for(study))]
    if study_name:
        if study_name not in names:
            raise ConfigError(f"{study}: no study {study_name!r}; studies: {', '.join(names) or 'none'}")
        return study, study_name
    if len(names) != 1:
        raise ConfigError(f"{study}: holds {len(names)} studies ({', '.join(names) or 'none'}); pick one with --study-name")
    return study, names[0]


def load(study: str, study_name: str | None = None) -> optuna.Study:
    """Open a stored study by name or URL (read and annotate; no sampling)."""
    url, name = resolve_study(study, study_name)
    return optuna.load_study(study_name=name, storage=storage_for(url))
