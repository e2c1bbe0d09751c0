"""`tuner report`: one self-contained HTML page per study (or an overlay of several studies).

The page reads only what the study stores (Optuna's trials, states, values and user attributes), so
it can be drawn while a study runs (`--watch`) or long after, on any machine. plotly.js is inlined
once; the page makes no network request and opens from disk.

Each section is a small function returning HTML; the figures use `optuna.visualization` where it
already draws the thing (importances, parallel coordinates, history) and plotly directly otherwise.
"""

from __future__ import annotations

import copy
import html
import math
import time
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import optuna
import plotly.graph_objects as go
from optuna.trial import FrozenTrial, TrialState
from plotly.offline import get_plotlyjs
from plotly.subplots import make_subplots

from trainer.events import PHASES
from tuner.remeasure import confirmed_speedup
from tuner.select import baseline_trial, best_feasible, is_feasible, pareto_set
from tuner.explain import quality_cell
from tuner.summary import StudySummary, kind_baselines, kinds_text, knn_key, speedup_of, summarize, trial_kind
from tuner.verdicts import compile_break_even, verdict

STATE_STYLE = {  # marker per trial kind on the Pareto plot
    "complete": dict(color="#1f77b4", symbol="circle", size=9),
    "infeasible": dict(color="#b0b0b0", symbol="circle-open", size=9),
    "pareto": dict(color="#2ca02c", symbol="circle", size=12, line=dict(color="black", width=1)),
    "pruned": dict(color="#ff7f0e", symbol="triangle-down", size=10),
    "failed": dict(color="#d62728", symbol="x", size=10),
    "baseline": dict(color="black", symbol="star", size=18),
    # open, and drawn around the point: the winner is also a Pareto point, and may be the baseline itself
    "winner": dict(color="#9467bd", symbol="diamond-open", size=24, line=dict(width=3)),
}


class Page:
    """Collects sections; writes one HTML file with plotly.js inlined once."""

    def __init__(self, title: str, refresh_s: float | None = None):
        self.title, self.refresh_s = title, refresh_s
        self.sections: list[str] = []
        self.figures = 0

    def add(self, heading: str, body: str, anchor: str) -> None:
        self.sections.append(f'<section id="{anchor}"><h2>{html.escape(heading)}</h2>{body}</section>')

    def figure(self, fig: go.Figure) -> str:
        self.figures += 1
        fig.update_layout(template="plotly_white", margin=dict(l=60, r=20, t=50, b=50))
        return fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"fig{self.figures}",
                           config={"displaylogo": False, "responsive": True})

    def render(self) -> str:
        # at least 1 s: content="0" would reload the page in a tight loop
        refresh = f'<meta http-equiv="refresh" content="{max(1, math.ceil(self.refresh_s))}">' if self.refresh_s else ""
        return (
            f"<!DOCTYPE html><html><head><meta charset=\"utf-8\">{refresh}<title>{html.escape(self.title)}</title>"
            f"<style>{CSS}</style><script type=\"text/javascript\">{get_plotlyjs()}</script></head>"
            f"<body><h1>{html.escape(self.title)}</h1>{''.join(self.sections)}"
            f"<p class=\"foot\">Written {datetime.now():%Y-%m-%d %H:%M:%S} from the study database; "
            f"every number on this page was measured on the hardware named above.</p>"
            f"<script>{SORT_JS}</script></body></html>"
        )


CSS = """
body{font-family:system-ui,sans-serif;margin:24px auto;max-width:1200px;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:32px}
.cards{display:flex;flex-wrap:wrap;gap:12px}.card{border:1px solid #ddd;border-radius:6px;padding:10px 14px;min-width:170px}
.card b{display:block;font-size:1.4em}.note{color:#555}.warn{color:#a15c00}
table.trials{border-collapse:collapse;font-size:0.85em;width:100%}
table.trials th,table.trials td{border-bottom:1px solid #eee;padding:3px 6px;text-align:left;vertical-align:top}
table.trials th{cursor:pointer;background:#f6f6f6;position:sticky;top:0}.foot{color:#777;font-size:0.8em;margin-top:32px}
"""

SORT_JS = """
document.querySelectorAll('table.trials th').forEach(function(th, col){
  th.addEventListener('click', function(){
    var table = th.closest('table'), body = table.tBodies[0], rows = Array.from(body.rows);
    var asc = th.dataset.asc !== 'true'; th.dataset.asc = asc;
    rows.sort(function(a, b){
      var x = a.cells[col].dataset.v, y = b.cells[col].dataset.v, nx = parseFloat(x), ny = parseFloat(y);
      var c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : String(x).localeCompare(String(y));
      return asc ? c : -c;
    });
    rows.forEach(function(r){ body.appendChild(r); });
  });
});
"""


# ---- reading a study --------------------------------------------------------------------------------


def trial_config(t: FrozenTrial) -> dict[str, Any]:
    return t.user_attrs.get("config") or {}


def config_value(t: FrozenTrial, path: str) -> Any:
    node: Any = trial_config(t)
    for part in path.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def winner(study: optuna.Study) -> FrozenTrial | None:
    """The trial `tuner confirm` measured if it ran, else the fastest feasible trial (`best_feasible`: on several
    kinds of hardware, by the speedup against its own kind's baseline)."""
    number = (study.user_attrs.get("confirm") or {}).get("trial")
    if number is not None:
        return study.get_trials(deepcopy=False)[number]
    return best_feasible(study)


def study_wall_s(trials: list[FrozenTrial]) -> float | None:
    starts = [t.datetime_start for t in trials if t.datetime_start]
    ends = [t.datetime_complete for t in trials if t.datetime_complete]
    return (max(ends) - min(starts)).total_seconds() if starts and ends else None


def last_intermediate(t: FrozenTrial, phase: str) -> float | None:
    values = (t.user_attrs.get("intermediate_values") or {}).get(phase) or {}
    if not values:
        return None
    return float(values[max(values, key=lambda k: int(k))])


# ---- sections ------------------------------------------------------------------------------------


def headline(study: optuna.Study, s: StudySummary) -> str:
    base, win = baseline_trial(study), winner(study)
    confirm = study.user_attrs.get("confirm") or {}
    cards = []

    def card(label: str, value: str, note: str = "") -> None:
        cards.append(f'<div class="card">{html.escape(label)}<b>{value}</b><span class="note">{html.escape(note)}</span></div>')

    tp = lambda t: t.user_attrs.get("throughput_img_s") if t else None  # noqa: E731
    knn = lambda t: t.user_attrs.get(knn_key(t)) if t else None  # noqa: E731
    card("baseline throughput", _num(tp(base), " img/s"), f"trial {base.number}" if base else "no baseline yet")
    card("winner throughput", _num(tp(win), " img/s"), f"trial {win.number}" if win else "no feasible trial yet")
    claim = confirmed_speedup(confirm)
    if claim and win is not None and confirm.get("trial") == win.number:
        card("confirmed speedup", f"{claim[0]:.2f}x", claim[1])
    elif win is not None and speedup_of(study, win) is not None:
        card("speedup (unconfirmed)", f"{speedup_of(study, win):.2f}x", "run `tuner confirm` for its spread")
    card("kNN top-1 baseline / winner", f"{_num(knn(base))} / {_num(knn(win))}", "percent")
    if win is not None:
        quality = verdict(study, win)
        card("quality verdict", quality.short, quality.text.removeprefix("quality: "))
        compiled = compile_break_even(study, win)
        if compiled is not None:
            steps = compiled["break_even_steps"]
            card("compile break-even", f"{steps:,.0f} steps" if steps is not None else "never", compiled["text"])
    if knn(base) is not None and knn(win) is not None:
        noise = s.knn_noise_points
        within = noise is not None and abs(knn(win) - knn(base)) <= noise and not s.measures_nothing
        card("kNN difference", f"{knn(win) - knn(base):+.1f} pts",
             f"noise {noise:.1f} pts{' (within noise)' if within else ''}" if noise is not None else "noise not measured")
    trials = study.get_trials(deepcopy=False)
    card("trials", " · ".join(f"{n} {k.lower()}" for k, n in sorted(s.states.items())),
         ", ".join(f"{n} {r}" for r, n in s.fail_reasons.items()))
    wall = study_wall_s(trials)
    card("study wall time", _num(wall / 60 if wall else None, " min"), f"pruning saved {s.time_saved_by_pruning_s / 60:.1f} min")
    hw = s.hardware or {}
    hw_text = ", ".join(f"{k}: {v}" for k, v in hw.items()) or "not recorded"
    warns = "".join(f'<p class="warn">{html.escape(w)}</p>' for w in s.warnings)
    per_kind = kinds_text(s.hardware_kinds)
    kinds = f'<p class="note">{html.escape(per_kind[0].upper() + per_kind[1:])}.</p>' if per_kind else ""
    return f'<div class="cards">{"".join(cards)}</div><p class="note">Hardware: {html.escape(hw_text)}</p>{kinds}{warns}'


def pareto_figure(studies: list[optuna.Study], summaries: list[StudySummary]) -> go.Figure:
    """Throughput (x) against kNN top-1 (y): every trial a point, by kind; the kNN constraint line."""
    fig = go.Figure()
    overlay = len(studies) > 1
    for study, s in zip(studies, summaries):
        prefix = f"{study.study_name} ({_hw_label(s)}): " if overlay else ""
        trials = study.get_trials(deepcopy=False)
        base, win = baseline_trial(study), winner(study)
        front = {t.number for t in pareto_set(study)}
        groups: dict[str, list[FrozenTrial]] = {k: [] for k in ("complete", "infeasible", "pareto", "pruned", "failed")}
        for t in trials:
            if t.state == TrialState.PRUNED:
                groups["pruned"].append(t)
            elif t.state == TrialState.FAIL or t.user_attrs.get("fail_reason"):
                groups["failed"].append(t)
            elif t.state == TrialState.COMPLETE:
                groups["pareto" if t.number in front else ("complete" if is_feasible(t) else "infeasible")].append(t)
        measured = [t.values for t in trials if t.state == TrialState.COMPLETE and t.values and not t.user_attrs.get("fail_reason")]
        ys = [v[1] for v in measured] or [0.0]
        xs = [v[0] for v in measured] or [1.0]
        line = _constraint_line(study)
        floor = min(ys + ([line] if line is not None else []))  # the strip sits below every point and the constraint
        strip_y = floor - max(2.0, 0.08 * (max(ys) - min(ys) + 1))
        for kind, members in groups.items():
            if not members:
                continue
            x, y, text = [], [], []
            for i, t in enumerate(members):
                if kind == "failed":
                    x.append(min(xs) + (max(xs) - min(xs) + 1) * (i + 0.5) / len(members))
                    y.append(strip_y)
                elif kind == "pruned":
                    x.append(last_intermediate(t, "speed") or min(xs))
                    y.append(last_intermediate(t, "quality") if last_intermediate(t, "quality") is not None else strip_y)
                else:
                    x.append(t.values[0])
                    y.append(t.values[1])
                text.append(_hover(study, t))
            name = {"complete": "feasible", "infeasible": "infeasible (constraint)",
                    # on several kinds of hardware the set is by own-kind speedup (`speed_of`), not by this x axis
                    "pareto": "Pareto set (by speedup on own hardware kind)" if len(s.hardware_kinds) > 1 else "Pareto set",
                    "pruned": "pruned (last measured values)", "failed": "failed (no values; on the strip)"}[kind]
            fig.add_trace(go.Scatter(x=x, y=y, mode="markers", name=prefix + name, marker=STATE_STYLE[kind],
                                     text=text, hovertemplate="%{text}<extra></extra>",
                                     customdata=[t.number for t in members]))
        for kind, t in (("baseline", base), ("winner", win)):
            if t is not None and t.values:
                fig.add_trace(go.Scatter(x=[t.values[0]], y=[t.values[1]], mode="markers", name=prefix + kind,
                                         marker=STATE_STYLE[kind], text=[_hover(study, t)], hovertemplate="%{text}<extra></extra>",
                                         customdata=[t.number]))
        if line is not None and not overlay:
            fig.add_hline(y=line, line_dash="dash", line_color="#2ca02c",
                          annotation_text=f"kNN constraint: baseline - {study.user_attrs.get('knn_tolerance_effective', 0):.1f} pts",
                          annotation_position="bottom right")
            fig.add_hrect(y0=line, y1=max(ys) + 5, fillcolor="#2ca02c", opacity=0.06, line_width=0)
        if groups["failed"] and not overlay:
            # inside the plot at its left edge (right of x=min(xs) it ran into the y-axis tick labels)
            fig.add_annotation(xref="paper", x=0.005, y=strip_y, text="failed trials", showarrow=False, xanchor="left",
                               yshift=14, font=dict(color=STATE_STYLE["failed"]["color"]))
    fig.update_layout(title="Throughput against kNN top-1 (up and to the right is better)",
                      xaxis_title="throughput (images/s)", yaxis_title="kNN top-1 (%)", height=520)
    return fig


def _constraint_line(study: optuna.Study) -> float | None:
    knn, tol = study.user_attrs.get("baseline_knn_top1"), study.user_attrs.get("knn_tolerance_effective")
    return knn - tol if knn is not None and tol is not None else None


def _hover(study: optuna.Study, t: FrozenTrial) -> str:
    u = t.user_attrs
    lines = [f"trial {t.number} ({t.state.name.lower()}{', ' + u['role'] if u.get('role') not in (None, 'search') else ''})"]
    if t.values:
        lines.append(f"throughput {t.values[0]:.1f} img/s, kNN {t.values[1]:.1f}%")
    speedup = speedup_of(study, t)
    if speedup is not None:
        lines.append(f"speedup {speedup:.2f}x")
    reason = u.get("fail_reason") or u.get("prune_reason")
    if reason:
        lines.append(f"reason: {reason}")
    lines += [f"{k} = {v}" for k, v in sorted(t.params.items())]
    return "<br>".join(html.escape(str(x)) for x in lines)


def waterfall_section(study: optuna.Study, page: Page) -> str:
    """The measured path from the baseline to the winner (from `tuner explain`)."""
    explain = study.user_attrs.get("explain")
    if not explain or not explain.get("steps"):
        return (f'<p class="note">Not measured yet. Run <code>tuner explain {html.escape(study.study_name)}</code> '
                "to measure the baseline-to-winner path one knob at a time; this chart then shows each knob's "
                "measured share of the speedup.</p>")
    steps = explain["steps"]
    labels = ["baseline"] + [f"{s['knob']}: {s['from']} → {s['to']}" for s in steps] + ["winner"]
    base_tp = explain["baseline_throughput_img_s"]
    deltas = [base_tp] + [s["throughput_img_s"] - p for s, p in zip(steps, [base_tp] + [x["throughput_img_s"] for x in steps])]
    fig = go.Figure(go.Waterfall(
        x=labels, y=deltas + [0], measure=["absolute"] + ["relative"] * len(steps) + ["total"],
        text=[f"{base_tp:.1f}"] + [f"x{s['step_speedup']:.2f} (cum. x{s['cumulative_speedup']:.2f})" for s in steps]
        + [f"{steps[-1]['throughput_img_s']:.1f}"],
        textposition="outside", connector=dict(line=dict(color="#999")),
    ))
    fig.update_layout(title=f"Speedup path, trial {explain.get('baseline_trial')} → trial {explain.get('winner_trial')} "
                      "(each bar measured, median of repeats)", yaxis_title="throughput (images/s)", height=460)
    rows = "".join(
        f"<tr><td>{html.escape(s['knob'])}</td><td>{html.escape(str(s.get('class', '-')))}</td>"
        f"<td>{s['step_speedup']:.2f}x</td><td class=\"{_parity_css(s)}\">{html.escape(quality_cell(s))}</td></tr>"
        for s in steps)
    table = (f'<table class="trials" id="parity"><thead><tr><th>knob</th><th>class</th><th>step speedup</th>'
             f"<th>quality verdict</th></tr></thead><tbody>{rows}</tbody></table>")
    return page.figure(fig) + table


def _parity_css(step: dict[str, Any]) -> str:
    return "warn" if (step.get("parity") or {}).get("verdict") == "failed" else ""


def phases_figure(study: optuna.Study) -> go.Figure | None:
    """Stacked time per phase for the baseline, the winner and the Pareto set."""
    base, win = baseline_trial(study), winner(study)
    chosen: list[tuple[str, FrozenTrial]] = []
    for label, t in [("baseline", base), ("winner", win)] + [("Pareto", t) for t in pareto_set(study)]:
        if t is not None and t.user_attrs.get("phases_ms") and all(t.number != c.number for _, c in chosen):
            chosen.append((label, t))
    if not chosen:
        return None
    names = [f"{label} #{t.number}" for label, t in chosen]
    fig = go.Figure()
    for phase in PHASES:
        fig.add_trace(go.Bar(name=phase.replace("_", " "), x=names,
                             y=[t.user_attrs["phases_ms"].get(phase, 0.0) for _, t in chosen]))
    fig.update_layout(barmode="stack", title="Where the time goes (ms per optimizer step, from profiled steps after the throughput windows)",
                      yaxis_title="ms per step", height=440)
    return fig


def batch_figure(study: optuna.Study) -> go.Figure | None:
    """Throughput and peak memory against batch size, coloured by precision; out-of-memory trials marked."""
    trials = [t for t in study.get_trials(deepcopy=False) if config_value(t, "optim.batch_size") is not None]
    if not trials:
        return None
    fig = make_subplots(rows=1, cols=2, subplot_titles=("throughput (img/s)", "peak memory (MiB)"))
    palette = {"fp32": "#1f77b4", "bf16": "#ff7f0e", "fp16": "#2ca02c"}
    for precision in sorted({config_value(t, "system.precision") or "fp32" for t in trials}):
        group = [t for t in trials if (config_value(t, "system.precision") or "fp32") == precision]
        ok = [t for t in group if t.user_attrs.get("throughput_img_s") is not None and not t.user_attrs.get("fail_reason")]
        oom = [t for t in group if t.user_attrs.get("fail_reason") == "oom"]
        color = palette.get(precision, "#555")
        for col, key in ((1, "throughput_img_s"), (2, "peak_memory_mb")):
            fig.add_trace(go.Scatter(
                x=[config_value(t, "optim.batch_size") for t in ok], y=[t.user_attrs.get(key) for t in ok],
                mode="markers", name=precision, legendgroup=precision, showlegend=col == 1,
                marker=dict(color=color, size=9), text=[_hover(study, t) for t in ok], hovertemplate="%{text}<extra></extra>",
            ), row=1, col=col)
            if oom:
                fig.add_trace(go.Scatter(
                    x=[config_value(t, "optim.batch_size") for t in oom], y=[0.0] * len(oom), mode="markers",
                    name=f"{precision} out of memory", legendgroup=precision, showlegend=col == 1,
                    marker=dict(color=color, symbol="x", size=12), text=[_hover(study, t) for t in oom],
                    hovertemplate="%{text}<extra></extra>",
                ), row=1, col=col)
    sizes = sorted({config_value(t, "optim.batch_size") for t in trials})
    fig.update_xaxes(title_text="batch size", type="log", tickvals=sizes, ticktext=[str(b) for b in sizes])
    fig.update_layout(title="Batch size, precision and memory", height=440, margin=dict(t=90))
    return fig


def optuna_figures(study: optuna.Study) -> list[tuple[str, go.Figure | str]]:
    """Optuna's own plots, one per objective, with `target=` as multi-objective studies need."""
    from optuna import visualization as vis

    out: list[tuple[str, go.Figure | str]] = []
    study = measured_view(study)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    targets: list[tuple[str, Callable[[FrozenTrial], float]]] = [
        ("throughput (img/s)", lambda t: t.values[0]), ("kNN top-1 (%)", lambda t: t.values[1])]
    for name, target in targets:
        for title, draw in (("parameter importances", vis.plot_param_importances),
                            ("parallel coordinates", vis.plot_parallel_coordinate),
                            ("optimization history", vis.plot_optimization_history)):
            try:
                with warnings.catch_warnings():  # optuna's notes on tiny studies; the page says what it drew
                    warnings.simplefilter("ignore", UserWarning)
                    if len(complete) < 2:
                        raise ValueError("needs at least two complete trials")
                    if title == "parameter importances":
                        # Importance evaluators look at what drives *low* values; both objectives are maximized.
                        fig = draw(study, target=lambda t, f=target: -f(t), target_name=name)
                    else:
                        fig = draw(study, target=target, target_name=name)
                if not fig.data:  # e.g. no searched parameter among the complete trials (only the baseline's)
                    raise ValueError("no searched parameter among the complete trials")
                if title == "optimization history":
                    _add_pruned(fig, study, name)
                    if len(study.trials) <= 20:
                        fig.update_xaxes(dtick=1)  # trial numbers, not 0.5 steps
                fig.update_layout(title=f"{title}: {name}", height=420)
                out.append((f"{title}: {name}", fig))
            except Exception as exc:  # a study too small or too uniform for this plot
                out.append((f"{title}: {name}", f"not drawn: {exc}"))
    return out


def measured_view(study: optuna.Study) -> optuna.Study:
    """An in-memory copy in which the out-of-memory trials are FAIL, without their placeholder values.

    Out-of-memory trials are stored COMPLETE with (0, 0) and violated constraints so the sampler learns
    the memory boundary; Optuna's plots must not draw those zeros as measurements. They stay in the copy
    (as failed trials, which the plots skip) so every trial keeps its number on the plots' trial axes.
    """
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    view = optuna.create_study(directions=study.directions, study_name=study.study_name)
    optuna.logging.set_verbosity(level)
    trials = []
    for t in study.get_trials(deepcopy=False):
        if t.state == TrialState.COMPLETE and t.user_attrs.get("fail_reason"):
            t = copy.copy(t)
            t.state, t.values = TrialState.FAIL, None
        trials.append(t)
    view.add_trials(trials)
    return view


def _add_pruned(fig: go.Figure, study: optuna.Study, target_name: str) -> None:
    pruned = study.get_trials(deepcopy=False, states=(TrialState.PRUNED,))
    phase = "speed" if target_name.startswith("throughput") else "quality"
    points = [(t.number, last_intermediate(t, phase)) for t in pruned]
    points = [(n, v) for n, v in points if v is not None]
    if points:
        fig.add_trace(go.Scatter(x=[n for n, _ in points], y=[v for _, v in points], mode="markers",
                                 name="pruned (last value)", marker=STATE_STYLE["pruned"]))


def trials_table(study: optuna.Study) -> str:
    """Every trial: number, state, params, throughput, speedup, kNN, peak memory, fail or prune reason."""
    trials = study.get_trials(deepcopy=False)
    keys = sorted({k for t in trials for k in t.params})
    kinds, measured = kind_baselines(study), study.user_attrs.get("baselines_by_kind") or {}
    several = len(kinds) > 1  # then a hardware column: each speedup is against its own kind's baseline
    head = (["#", "state", "role"] + keys + ["throughput img/s", "speedup"] + (["hardware"] if several else [])
            + ["kNN top-1", "peak MiB", "reason"])
    rows = []
    for t in trials:
        u = t.user_attrs
        reason = u.get("fail_reason") or u.get("prune_reason") or ""
        if u.get("fail_message"):
            reason += f": {u['fail_message']}"
        if u.get("fail_step") is not None:
            reason += f" (step {u['fail_step']})"
        kind = trial_kind(study, t)
        hardware = [(kind or "") + (" (no baseline here: speedup across hardware)"
                                    if kind in kinds and kinds[kind] is None else "")] if several else []
        cells = [t.number, t.state.name.lower(), u.get("role", "search")] + [t.params.get(k, "") for k in keys] + [
            _r(u.get("throughput_img_s")), _r(speedup_of(study, t, measured), 2)] + hardware + [
            _r(u.get(knn_key(t))), _r(u.get("peak_memory_mb"), 0), reason]
        rows.append("<tr>" + "".join(f'<td data-v="{html.escape(str(c))}">{html.escape(str(c))}</td>' for c in cells) + "</tr>")
    header = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    return (f'<p class="note">Click a column to sort.</p><table class="trials"><thead><tr>{header}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table>')


def _r(v: Any, digits: int = 1) -> Any:
    return "" if v is None else round(float(v), digits)


def _num(v: float | None, unit: str = "") -> str:
    return "–" if v is None else f"{v:.1f}{unit}"


def _hw_label(s: StudySummary) -> str:
    """Device, CPU model and core count, as `tuner.study.hardware_fingerprint` records them."""
    hw = s.hardware or {}
    parts = [str(hw["device"]) if hw.get("device") else None, str(hw["cpu_model"]) if hw.get("cpu_model") else None,
             f"{hw['cpu_cores']} cores" if hw.get("cpu_cores") else None]
    return " / ".join(p for p in parts if p) or "hardware not recorded"


# ---- pages ------------------------------------------------------------------------------------------


def render_study(study: optuna.Study, refresh_s: float | None = None) -> str:
    """The whole page for one study, as HTML text."""
    s = summarize(study)
    page = Page(f"Study {study.study_name}", refresh_s)
    page.add("Headline", headline(study, s), "headline")
    if not any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
        page.add("Nothing measured yet", '<p class="warn">No trial of this study has completed yet '
                 f'({", ".join(f"{n} {k.lower()}" for k, n in s.states.items()) or "no trials"}); '
                 "the plots appear once one has.</p>", "empty")
    elif all(t.user_attrs.get("role") in ("baseline", "baseline_noise")
             for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if not t.user_attrs.get("fail_reason")):
        page.add("Only the baseline so far", '<p class="warn">Only the baseline has been measured yet; no search '
                 "trial has been measured, so the winner is the baseline itself. Search trials appear here as they finish.</p>",
                 "baseline-only")
    page.add("Trade-off: throughput against kNN", page.figure(pareto_figure([study], [s])), "pareto")
    page.add("Speedup path (measured per knob)", waterfall_section(study, page), "waterfall")
    phases = phases_figure(study)
    page.add("Where the time goes", page.figure(phases) if phases else '<p class="note">No phase breakdown stored yet.</p>', "phases")
    batch = batch_figure(study)
    page.add("Batch size, precision, memory", page.figure(batch) if batch else '<p class="note">No trials yet.</p>', "batch")
    body = "".join(page.figure(f) if isinstance(f, go.Figure) else f'<p class="note">{html.escape(title)}: {html.escape(f)}</p>'
                   for title, f in optuna_figures(study))
    page.add("Optuna's view (per objective)", body, "optuna")
    page.add("All trials", trials_table(study), "trials")
    return page.render()


def render_comparison(studies: list[optuna.Study]) -> str:
    """Several studies (machines, search spaces) on one Pareto plot, hardware in the legend."""
    summaries = [summarize(st) for st in studies]
    page = Page("Studies compared: " + ", ".join(st.study_name for st in studies))
    rows = "".join(f"<li><b>{html.escape(st.study_name)}</b>: {html.escape(_hw_label(s))}; "
                   f"{', '.join(f'{n} {k.lower()}' for k, n in s.states.items())}</li>" for st, s in zip(studies, summaries))
    page.add("Studies", f"<ul>{rows}</ul>", "studies")
    page.add("Trade-off: throughput against kNN", page.figure(pareto_figure(studies, summaries)), "pareto")
    return page.render()


def write_report(studies: list[optuna.Study], out: Path, refresh_s: float | None = None) -> Path:
    """Render and write atomically (a watching browser never reads half a file)."""
    text = render_study(studies[0], refresh_s) if len(studies) == 1 else render_comparison(studies)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(out)
    return out


def default_report_path(studies: list[optuna.Study]) -> Path:
    if len(studies) == 1:
        return Path("studies") / studies[0].study_name / "report.html"
    return Path("studies") / ("compare-" + "-".join(s.study_name for s in studies) + ".html")


def watch(load: Callable[[], list[optuna.Study]], out: Path, every_s: float, echo: Callable[[str], None] = print,
          max_rounds: int | None = None) -> None:
    """Rewrite the report every `every_s` seconds (the page reloads itself) until interrupted."""
    rounds = 0
    while max_rounds is None or rounds < max_rounds:
        t0 = time.perf_counter()
        write_report(load(), out, refresh_s=every_s)
        echo(f"report written: {out} ({out.stat().st_size / 1e6:.1f} MB, {time.perf_counter() - t0:.1f} s); next in {every_s:.0f} s")
        rounds += 1
        if max_rounds is None or rounds < max_rounds:
            time.sleep(every_s)


__all__ = ["render_study", "render_comparison", "write_report", "default_report_path", "watch"]
