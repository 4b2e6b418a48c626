"""``spool demo`` (what ``make demo`` runs): a small observing night through the real daemons.

1. writes a sample night into the first landing area: ``--datasets`` datasets named like
   ``lst1.20261123.run012345.dl0`` holding ``--files`` small files in all, plus three deliberately
   bad events (wrong checksum, path outside the landing area, dataset name off-pattern);
2. starts ``spool run all`` as a child process (logs in ``<state_dir>/demo-daemons.log``);
3. publishes every ``file.ready`` as CloudEvents JSON, like an instrument's DAQ would;
4. follows the catalogue and the dead-letter queue with a progress bar until every event is
   accounted for (ingested, or dead-lettered with its reason);
5. follows the copies the replication rules (``[rules.*]`` of the config) asked for until every
   one is made and verified (disk copies at another site, the archive copy on tape), or has failed;
6. when the rules put the night on tape: evicts the disk copies of the last dataset (a ``dl1``
   one, which the example config keeps only on tape), recalls it from tape to the first disk
   endpoint, and verifies every recalled file's checksum;
7. prints a summary and stops the daemons with SIGTERM. Exit code 1 if any event is unaccounted
   for, if a good file failed / a bad one was accepted, if a rule's copy is missing, or if the
   recall did not bring back every file intact.

Where Debian's ``xrootd-server`` is installed (``make demo`` installs it where it may, as it does
RabbitMQ), the offsite disk endpoint of the config (the first disk endpoint after ingest's) becomes a
real XRootD site for the run: a local server (``common/storage/devserver.py``) and the endpoint
switched to ``backend = "xrootd"`` for the daemons (through ``SPOOL_STORAGE__<NAME>__*``), so the
night's offsite copies go over ``root://``. Without it the demo says so and keeps the posix site.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from common.bus import dead as deadletters
from common.bus.connection import connect
from common.catalogue import Catalogue
from common.cli import app
from common.cli._util import console, settings_from, styled
from common.cli.publish import file_ready_event, publish_events
from common.codec import to_cloudevent
from common.config import Settings
from common.messages import FileReady, MetaValue, RecallRequest, new_id
from common.storage.devserver import LocalXrootd, XrootdUnavailable

EXPECTED_BAD = {"checksum_mismatch", "path_outside_area", "bad_dataset_name"}


def make_night(landing: Path, files: int, datasets: int, seed: int) -> list[dict[str, Any]]:
    """Write the sample files and return their ``file.ready`` events (good ones first)."""
    rng = random.Random(seed)
    day = datetime.now(UTC).strftime("%Y%m%d")
    first_run = 10_000 + seed % 80_000
    events: list[dict[str, Any]] = []
    for i in range(files):
        run = first_run + i % datasets
        # The last dataset is a dl1 one: the example config archives it to tape only (no offsite
        # disk copy), so the demo can evict it from disk and recall it.
        level = "dl1" if i % datasets == datasets - 1 else "dl0"
        dataset = f"lst1.{day}.run{run:06d}.{level}"
        path = landing / f"night-{seed}" / f"run{run:06d}" / f"subrun{i // datasets:04d}.fits.fz"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.randbytes(rng.randint(512, 4096)))
        meta: dict[str, MetaValue] = {"run": run, "subrun": i // datasets, "telescope": "LST1", "night": day}
        events.append(
            file_ready_event(path, dataset, checksum=True, meta=meta, parents=[], source="lst1-daq")
        )
    return events


def bad_events(landing: Path, seed: int) -> list[dict[str, Any]]:
    day = datetime.now(UTC).strftime("%Y%m%d")
    bad_dir = landing / f"night-{seed}" / "bad"
    bad_dir.mkdir(parents=True, exist_ok=True)
    corrupt = bad_dir / "corrupt.fits.fz"
    corrupt.write_bytes(b"these bytes do not match the checksum the DAQ announced")
    offpattern = bad_dir / "offpattern.fits.fz"
    offpattern.write_bytes(b"x" * 100)
    msgs = [
        FileReady(
            id=new_id(),
            source="lst1-daq",
            path=str(corrupt),
            dataset=f"lst1.{day}.run099999.dl0",
            adler32="deadbeef",
        ),
        FileReady(id=new_id(), source="lst1-daq", path="/etc/passwd", dataset=f"lst1.{day}.run099999.dl0"),
        FileReady(id=new_id(), source="lst1-daq", path=str(offpattern), dataset="Not A Dataset Name"),
    ]
    return [to_cloudevent(m) for m in msgs]


async def _progress(
    settings: Settings, total: int, good_ids: set[str], bad_ids: set[str], give_up_after: float
) -> dict[str, Any]:
    catalogue = await Catalogue.open(settings.catalogue.url)
    connection = await connect(settings.bus, name="spool-demo")
    all_ids = sorted(good_ids | bad_ids)
    started = time.monotonic()
    done: dict[str, Any] = {}
    try:
        with Progress(
            TextColumn("ingesting"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
        ) as bar:
            task = bar.add_task("ingest", total=total)
            while True:
                states = await catalogue.queries.request_state(all_ids)
                ingested = {i for i, r in states.items() if r.state == "done"}
                letters = await deadletters.browse(connection, [settings.dead_queue("ingest")])
                dead = {d.message_id: d.reason for d in letters if d.message_id in good_ids | bad_ids}
                accounted = len(ingested | dead.keys())
                bar.update(task, completed=accounted)
                if accounted >= total or time.monotonic() - started > give_up_after:
                    break
                await asyncio.sleep(0.5)
        done = {"ingested": ingested, "dead": dead, "elapsed": time.monotonic() - started}
    finally:
        await connection.close()
        await catalogue.close()
    return done


async def _replication(settings: Settings, give_up_after: float) -> dict[str, Any]:
    """Follow the copies the rules asked for (other disks, tape) until none is pending."""
    catalogue = await Catalogue.open(settings.catalogue.url)
    disks = set(settings.storage) - {settings.first_disk()[0]}
    started = time.monotonic()
    try:
        with Progress(
            TextColumn("replicating"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
        ) as bar:
            task = bar.add_task("replicate", total=None)
            while True:
                usage = [u for u in await catalogue.endpoints.usage() if u.name in disks]
                made = sum(u.replicas.get("available", 0) for u in usage)
                failed = sum(u.replicas.get("failed", 0) for u in usage)
                pending = sum(
                    u.replicas.get(st, 0) for u in usage for st in ("queued", "waiting", "archiving")
                )
                bar.update(task, completed=made + failed, total=made + failed + pending)
                if not pending or time.monotonic() - started > give_up_after:
                    break
                await asyncio.sleep(0.5)
        rules = await catalogue.replication.rule_views()
    finally:
        await catalogue.close()
    return {
        "per_endpoint": {u.name: u.replicas.get("available", 0) for u in usage},
        "failed": failed,
        "pending": pending,
        "rules": {v.rule.id: v.replicas for v in rules},
        "elapsed": time.monotonic() - started,
    }


@app.command()
def demo(
    ctx: typer.Context,
    files: Annotated[int, typer.Option(help="Good files in the sample night.")] = 3000,
    datasets: Annotated[int, typer.Option(help="Datasets they are spread over.")] = 12,
    timeout: Annotated[float, typer.Option(help="Give up after this many seconds.")] = 300,
) -> None:
    """Generate a sample night, ingest it through the real daemons, and account for every file."""
    settings = settings_from(ctx)
    landing = next(iter(settings.landing_areas.values()))
    seed = int(time.time()) % 1_000_000
    console.print(
        Text.assemble(
            "state under ", (str(settings.state_dir), "bold"), f"; catalogue {settings.catalogue.url}"
        )
    )
    console.print(f"writing {files} files in {datasets} datasets under {landing} ...")
    good = make_night(landing, files, datasets, seed)
    bad = bad_events(landing, seed)
    log_path = settings.state_dir / "demo-daemons.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    remote = _remote_site(settings, env, seed)
    with log_path.open("ab") as log_file:
        cmd = [sys.executable, "-m", "daemons"]
        if ctx.obj.get("config"):
            cmd += ["--config", ctx.obj["config"]]
        daemons = subprocess.Popen([*cmd, "run", "all"], stdout=log_file, stderr=log_file, env=env)
        try:
            console.print(f"daemons started (pid {daemons.pid}, log {log_path})")
            t0 = time.monotonic()
            asyncio.run(publish_events(settings, good + bad))
            result = asyncio.run(
                _progress(
                    settings, len(good) + len(bad), {e["id"] for e in good}, {e["id"] for e in bad}, timeout
                )
            )
            result["elapsed"] = time.monotonic() - t0
            result["replication"] = asyncio.run(_replication(settings, timeout))
            if any(ep.kind == "tape" for ep in settings.storage.values()):
                result["recall"] = asyncio.run(_evict_and_recall(settings, good))
        finally:
            daemons.send_signal(signal.SIGTERM)
            try:
                daemons.wait(timeout=60)
            except subprocess.TimeoutExpired:
                daemons.kill()
            if remote is not None:
                remote.cleanup()
    raise typer.Exit(_summary(result, good, bad))


def _remote_site(settings: Settings, env: dict[str, str], seed: int) -> LocalXrootd | None:
    """Make the offsite endpoint a real XRootD site for this run (see the module docstring)."""
    first = settings.first_disk()[0]
    posix_disks = [n for n, ep in settings.storage.items() if ep.kind == "disk" and ep.backend == "posix"]
    offsite = next((n for n in posix_disks if n != first), None)
    if offsite is None:
        return None
    server = LocalXrootd()
    try:
        server.start()
    except XrootdUnavailable as exc:
        server.cleanup()
        why = str(exc).splitlines()[0]
        console.print(
            styled(
                f"no XRootD server here ({why}): offsite copies stay on the posix endpoint {offsite}",
                "yellow",
            ),
            "(apt-get install xrootd-server xrootd-client)",
        )
        return None
    url = f"{server.root_url('site-b')}/demo-{seed}"
    prefix = f"SPOOL_STORAGE__{offsite.upper()}__"
    env.update({f"{prefix}BACKEND": "xrootd", f"{prefix}URL": url, f"{prefix}TPC": "true"})
    settings.storage[offsite] = settings.storage[offsite].model_copy(
        update={"backend": "xrootd", "url": url, "tpc": True}
    )
    console.print(
        Text.assemble("offsite endpoint ", (offsite, "bold"), f" is a real XRootD site for this run: {url}")
    )
    return server


async def _evict_and_recall(settings: Settings, good: list[dict[str, Any]]) -> dict[str, Any]:
    """Drop the disk copies of the last dataset, recall it from tape, verify what came back."""
    from common.cli.recall import _request
    from common.cli.replication import evict_copies
    from common.storage.checksum import adler32_of_file

    dataset = good[-1]["data"]["dataset"]
    first, endpoint = settings.first_disk()
    catalogue = await Catalogue.open(settings.catalogue.url)
    try:
        evicted: dict[str, list[str]] = {"evicted": [], "kept": []}
        for name, ep in settings.storage.items():
            if ep.kind == "disk":
                done = await evict_copies(catalogue, name, ep, dataset=dataset)
                evicted["evicted"] += done["evicted"]
                evicted["kept"] += done["kept"]
        console.print(f"evicted {len(evicted['evicted'])} disk copies of {dataset}; recalling it from tape")
        msg = RecallRequest(source="spool-demo", dataset=dataset, destination=first, priority=5)
        completion = await _request(settings, msg, True, quiet=False) or {}
        files = await catalogue.queries.list_files(dataset=dataset, limit=100_000)
        intact = sum(
            1
            for f in files
            if (endpoint.root / f.name).is_file() and adler32_of_file(endpoint.root / f.name) == f.adler32
        )
    finally:
        await catalogue.close()
    return {
        "dataset": dataset, "files": len(files), "evicted": len(evicted["evicted"]),
        "kept": len(evicted["kept"]), "recalled": completion.get("files", 0),
        "failed": completion.get("failed") or [], "intact": intact,
    }  # fmt: skip


def _summary(result: dict[str, Any], good: list[dict[str, Any]], bad: list[dict[str, Any]]) -> int:
    good_ids, bad_ids = {e["id"] for e in good}, {e["id"] for e in bad}
    ingested, dead = result["ingested"], result["dead"]
    good_ok = len(good_ids & ingested)
    good_dead = {i: r for i, r in dead.items() if i in good_ids}
    bad_dead = {i: r for i, r in dead.items() if i in bad_ids}
    lost = (good_ids | bad_ids) - ingested - dead.keys()
    table = Table("", "count", title="demo summary", title_justify="left")
    table.add_row("published", str(len(good) + len(bad)))
    table.add_row("ingested", str(len(ingested)))
    table.add_row("failed (good files dead-lettered)", str(len(good_dead)))
    table.add_row(
        "dead-lettered as expected (bad events)", f"{len(bad_dead)}: {sorted(set(bad_dead.values()))}"
    )
    table.add_row("lost (unaccounted for)", str(len(lost)))
    table.add_row("files / s (publish to last registered)", f"{good_ok / max(result['elapsed'], 1e-9):.0f}")
    rep = result["replication"]
    copies = ", ".join(f"{n} {c}" for n, c in sorted(rep["per_endpoint"].items())) or "none (no rule)"
    table.add_row("copies made by the replication rules", copies)
    table.add_row("copies missing or failed", str(rep["pending"] + rep["failed"]))
    for rule_id, states in sorted(rep["rules"].items()):
        table.add_row(f"  rule {rule_id}", ", ".join(f"{st} {n}" for st, n in sorted(states.items())) or "-")
    rec = result.get("recall")
    if rec is not None:
        table.add_row(f"evicted from disk: {rec['dataset']}", f"{rec['evicted']} copies")
        table.add_row("recalled from tape and verified", f"{rec['intact']} of {rec['files']} files")
    console.print(table)
    ok = not lost and not good_dead and good_ok == len(good_ids) and set(bad_dead.values()) == EXPECTED_BAD
    ok = ok and rep["pending"] == 0 and rep["failed"] == 0
    if rec is not None:
        ok = ok and rec["evicted"] > 0 and not rec["failed"] and rec["intact"] == rec["files"]
    console.print(
        styled("every file accounted for", "green")
        if ok
        else styled("something was lost or misjudged", "red")
    )
    return 0 if ok else 1
