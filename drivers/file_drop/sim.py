"""A coordinate measuring machine that drops inspection reports into a file-drop equipment's folder.

Every few seconds one report for one machined part: mostly in tolerance, now and then a feature out of
tolerance, rarely a malformed file (a probe error in a value, an overflowed value such as 1e400 that
no JSON body can carry, or a report cut off after its header).
Files are written the way measuring software writes them: in pieces with short pauses under the final
name, or to a `.tmp` name renamed at the end. Job numbers continue across restarts (kept in state_dir).
"""

from __future__ import annotations

import asyncio
import os
import random
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import structlog

from drivers.sdk import EquipmentConfig

log = structlog.get_logger("edge_agent.simulate")


@dataclass(frozen=True, slots=True)
class Feature:
    """One characteristic of the part program: nominal and signed tolerances, in its unit."""

    name: str
    nominal: float
    lower_tol: float
    upper_tol: float
    unit: str = "mm"


# A machined bracket: two bored holes (H7), a hole pattern, outer dimensions, form and position.
PART = "BRKT-220"
FEATURES = (
    Feature("bore_A_diameter", 12.0, 0.0, 0.018),
    Feature("bore_B_diameter", 8.0, 0.0, 0.015),
    Feature("hole_pattern_pos_x", 45.0, -0.05, 0.05),
    Feature("hole_pattern_pos_y", 30.0, -0.05, 0.05),
    Feature("length_overall", 120.0, -0.1, 0.1),
    Feature("width", 60.0, -0.1, 0.1),
    Feature("thickness", 10.0, -0.05, 0.05),
    Feature("flatness_top", 0.0, 0.0, 0.02),
    Feature("perpendicularity_A", 0.0, 0.0, 0.03),
    Feature("surface_roughness_Ra", 0.8, -0.4, 0.4, "um"),
)
HEADER = "process_id,feature,nominal,measured,lower_tol,upper_tol,unit\n"


def measure(feature: Feature, rng: random.Random, *, defect: bool = False) -> float:
    """A plausible measured value: near the band's middle, or outside the band for a defect."""
    low = feature.nominal + feature.lower_tol
    high = feature.nominal + feature.upper_tol
    width = high - low
    if defect:
        # Mostly just out (major), sometimes far out (critical: beyond one band width).
        excess = width * rng.choice((rng.uniform(0.05, 0.8), rng.uniform(1.2, 2.5)))
        below = rng.random() < 0.5 and low - excess >= 0
        return low - excess if below else high + excess
    value = rng.gauss((low + high) / 2, width / 8)
    return min(max(value, low), high)


def build_report(job: str, rng: random.Random, *, defect_rate: float = 0.1, malformed_rate: float = 0.03) -> str:
    """The CSV text of one report for process `job`."""
    lines = [HEADER]
    if rng.random() < malformed_rate:
        kind = rng.choice(("probe_error", "overflow", "truncated"))
        if kind == "truncated":
            return HEADER
        bad = rng.randrange(len(FEATURES))
        glitch = "----" if kind == "probe_error" else "1e400"
    else:
        bad, glitch = -1, ""
    defects = {i for i in range(len(FEATURES)) if rng.random() < defect_rate / 3}
    for i, f in enumerate(FEATURES):
        measured = glitch if i == bad else f"{measure(f, rng, defect=i in defects):.4f}"
        lines.append(f"{job},{f.name},{f.nominal:.4f},{measured},{f.lower_tol:+.4f},{f.upper_tol:+.4f},{f.unit}\n")
    return "".join(lines)


async def write_slowly(path: Path, text: str, rng: random.Random, *, pause_s: float, via_tmp: bool) -> None:
    """Write `text` in a few pieces with pauses, under its final name or a `.tmp` name renamed at the end."""
    target = path.with_name(path.name + ".tmp") if via_tmp else path
    data = text.encode("utf-8")
    pieces = rng.randint(2, 4)
    cuts = sorted(rng.sample(range(1, len(data)), pieces - 1)) if len(data) > pieces else []
    with open(target, "wb") as f:
        start = 0
        for cut in [*cuts, len(data)]:
            f.write(data[start:cut])
            f.flush()
            start = cut
            if cut < len(data):
                await asyncio.sleep(pause_s * rng.uniform(0.5, 1.0))
        os.fsync(f.fileno())
    if via_tmp:
        os.replace(target, path)


def _next_job(counter_file: Path) -> int:
    try:
        n = int(counter_file.read_text().strip()) + 1
    except (OSError, ValueError):
        n = 4200
    counter_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = counter_file.with_name(counter_file.name + ".tmp")
    tmp.write_text(str(n))
    os.replace(tmp, counter_file)
    return n


async def simulate(
    equipment: EquipmentConfig, state_dir: Path, *, interval_s: float = 5.0, seed: int | None = None
) -> None:
    """Drop a CMM report into the equipment's folder every few seconds, until cancelled."""
    conn = equipment.connection
    directory = Path(conn.directory)
    # Pauses stay well under the stability window, as a healthy machine's do.
    pause_s = min(0.25, max(float(getattr(conn, "stable_s", 1.0)), 0.05) / 4)
    counter = Path(state_dir) / "simulate" / f"file_drop-{equipment.id}.job"
    rng = random.Random(seed)
    log.info("file_drop_sim_started", equipment_id=equipment.id, directory=str(directory), interval_s=interval_s)
    while True:
        directory.mkdir(parents=True, exist_ok=True)
        job = f"JOB-{_next_job(counter):06d}"
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
        path = directory / f"{PART}_{job}_{stamp}.csv"
        text = build_report(job, rng)
        await write_slowly(path, text, rng, pause_s=pause_s, via_tmp=rng.random() < 0.25)
        log.debug("report_written", equipment_id=equipment.id, file=path.name, process_id=job)
        await asyncio.sleep(interval_s * rng.uniform(0.6, 1.4))
