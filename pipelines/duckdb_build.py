"""The full feature build of an ``events`` source in DuckDB: the single-machine comparison.

`jobs.benchmark pipeline` times this beside the Spark build on the same generated log and checks
that both write the same examples (`compare_examples`). It follows the Spark build's rules
(`pipelines.source`, `pipelines.artifacts`, `pipelines.running`) in SQL:

  * validation: null required columns, uncastable values, negative action values, broken or
    future clocks, unknown event types, rows outside their file's date, exact duplicates;
  * sessions: the earliest impression event of each impression id, the actions of the same user
    and item within the attribution window (of its own day or the next), orphan / late / early
    actions rejected; ``example_id`` = Spark's ``xxhash64`` of the impression id;
  * the fit on the training window: vocabularies (count desc, value asc, min_count, max_vocab),
    dense mean / population std, dwell bin boundaries at the same ranks as the Spark fit
    (``artifacts.quantile_ranks``: ``ceil(q * n)``), the pseudo-label fallback means;
  * running features with window frames on the event time: ``RANGE BETWEEN ... AND 1 PRECEDING``
    is "strictly earlier"; the calendar-day window is a per-row frame start (midnight of day
    D - W + 1); sequences slice the user's time-ordered list of matching items.

What it does not do: write Delta, keep user state, or run nightly. It writes Parquet
(``examples/date=*/``, ``rejected.parquet``) and ``summary.json`` (with the fitted values). Scope: ``shape: events`` sources in
Parquet with a per-date path, time zone UTC, no ``date_column``; anything else is refused.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipelines.artifacts import _vocab_limits, quantile_ranks
from pipelines.build import example_columns, kernel_plan
from pipelines.preprocessing import Artifacts, vocab_tables
from pipelines.source import MIN_VALID_TIME_MS, file_date_regex
from pipelines.spec import DenseTransform, FeatureSpec, SourceFormat, TaskKind

DUCK_TYPE = {
    "string": "VARCHAR",
    "int": "INTEGER",
    "long": "BIGINT",
    "double": "DOUBLE",
    "float": "FLOAT",
    "boolean": "BOOLEAN",
}
DAY_MS = 86_400_000
_P1, _P2, _P3 = 0x9E3779B185EBCA87, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9
_P4, _P5 = 0x85EBCA77C2B2AE63, 0x27D4EB2F165667C5


def spark_xxhash64_long(values: np.ndarray, seed: int = 42) -> np.ndarray:
    """Spark's ``xxhash64`` of a bigint column (XXH64 of the 8-byte value, seed 42), vectorised.

    Args:
        values: [N] int64.
    Returns:
        [N] int64, equal to ``F.xxhash64(col)`` for a LongType column.
    """
    u64 = np.uint64

    def rotl(x: np.ndarray, r: int) -> np.ndarray:
        return (x << u64(r)) | (x >> u64(64 - r))

    with np.errstate(over="ignore"):
        x = values.astype(np.int64).view(np.uint64)
        h = np.full(x.shape, (seed + _P5 + 8) & (2**64 - 1), dtype=np.uint64)
        h ^= rotl(x * u64(_P2), 31) * u64(_P1)
        h = rotl(h, 27) * u64(_P1) + u64(_P4)
        h ^= h >> u64(33)
        h *= u64(_P2)
        h ^= h >> u64(29)
        h *= u64(_P3)
        h ^= h >> u64(32)
    return h.view(np.int64)


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _lit(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _check_scope(spec: FeatureSpec) -> None:
    src = spec.source
    problems = []
    if src.events is None:
        problems.append("source.shape must be 'events'")
    if src.format != SourceFormat.PARQUET:
        problems.append("source.format must be parquet")
    if not src.per_date:
        problems.append("source.path must hold a {date} placeholder")
    if src.timezone != "UTC":
        problems.append("source.timezone must be UTC")
    if src.date_column:
        problems.append("source.date_column is not supported")
    if src.tie_break:
        problems.append("source.tie_break is not supported")
    for g in ("user", "item"):
        for i, t in enumerate(getattr(spec, g).tables):
            if t.format != SourceFormat.PARQUET:
                problems.append(f"{g}.tables.{i}.format must be parquet")
    if problems:
        raise ValueError(
            f"spec {spec.name!r}: the DuckDB comparison build does not cover it: "
            + "; ".join(problems)
        )


def _validated_sql(spec: FeatureSpec, now_ms: int, future_tolerance_s: int) -> str:
    """One row per raw row: typed columns, file date, calendar day and the first reject reason
    (NULL = accepted), in the order of `pipelines.source.validate`."""
    src = spec.source
    ev = src.events
    assert ev is not None
    cols = list(src.columns)
    glob = src.path.replace("{date}", "*").removeprefix("file://").rstrip("/") + "/*.parquet"
    unit = 1000 if src.time_unit.value == "s" else 1
    casts = {c: f"TRY_CAST({_q(c)} AS {DUCK_TYPE[t]})" for c, t in src.columns.items()}
    checks: list[tuple[str, str]] = []
    required = [src.user_id, src.item_id, src.time_column, ev.type_column, ev.impression_id_column]
    checks += [(f"{_q(c)} IS NULL", f"null_value:{c}") for c in required]
    checks += [
        (f"{_q(c)} IS NOT NULL AND {casts[c]} IS NULL", f"bad_value:{c}")
        for c, t in src.columns.items()
        if t != "string"
    ]
    checks += [(f"{casts[c]} < 0", f"negative_value:{c}") for c in ev.action_values.values()]
    checks.append(("_t IS NULL OR _t < " + str(MIN_VALID_TIME_MS), "bad_time"))
    checks.append((f"_t > {now_ms + future_tolerance_s * 1000}", "future_time"))
    known = ", ".join(_lit(v) for v in [ev.impression_type, *ev.actions.values()])
    checks.append((f"{_q(ev.type_column)} NOT IN ({known})", "unknown_event_type"))
    checks.append(("_file_date IS NOT NULL AND _day <> _file_date", "outside_run_date"))
    reason = "CASE " + " ".join(f"WHEN {c} THEN {_lit(r)}" for c, r in checks) + " END"
    regex = file_date_regex(src.path)
    part = ", ".join(_q(c) for c in cols)
    dup = (
        f"CASE WHEN _reason IS NULL AND row_number() OVER (PARTITION BY {part} ORDER BY filename) "
        "> 1 THEN 'exact_duplicate' ELSE _reason END"
        if src.reject_exact_duplicates
        else "_reason"
    )
    return f"""
    WITH raw AS (
        SELECT {part}, filename,
               nullif(regexp_extract(filename, {_lit(regex)}, 1), '') AS _file_date
        FROM read_parquet({_lit(glob)}, filename = true, hive_partitioning = false)
    ), timed AS (
        SELECT *, TRY_CAST(TRY_CAST({_q(src.time_column)} AS BIGINT) * {unit} AS BIGINT) AS _t
        FROM raw
    ), dated AS (
        SELECT *, CASE WHEN _t BETWEEN -253402300799999 AND 253402300799999
                       THEN strftime(make_timestamp(_t * 1000), '%Y-%m-%d') END AS _day
        FROM timed
    ), staged AS (SELECT *, {reason} AS _reason FROM dated)
    SELECT {", ".join(f"{casts[c]} AS {_q(c)}" for c in cols)}, filename, _file_date,
           _day, _t AS event_time_ms, {dup} AS _reason
    FROM staged
    """


def _sessions_sql(spec: FeatureSpec) -> str:
    """Over table ``validated``: one row per accepted event with its session reason, as
    `pipelines.source.sessionize` (the earliest impression event of an id is the impression)."""
    src = spec.source
    ev = src.events
    assert ev is not None
    imp, typ = _q(ev.impression_id_column), _q(ev.type_column)
    uid, iid = _q(src.user_id), _q(src.item_id)
    window_ms = ev.attribution_window_s * 1000
    # Spark breaks equal-time impressions of one id by a hash of the row; here the row's columns
    # do (the synthetic and KuaiRand logs have no duplicate impression ids).
    order = ", ".join(_q(c) for c in src.columns)
    is_imp = f"{typ} = {_lit(ev.impression_type)}"
    return f"""
    WITH acc AS (
        SELECT *, row_number() OVER (
            PARTITION BY {imp} ORDER BY ({is_imp}) DESC, event_time_ms, {order}) AS _rank
        FROM validated WHERE _reason IS NULL
    ), first_imp AS (
        SELECT {imp} AS _id, event_time_ms AS _it, {uid} AS _iu, {iid} AS _ii, _day AS _idate
        FROM acc WHERE {is_imp} AND _rank = 1
    )
    SELECT acc.*,
      CASE WHEN {is_imp} THEN CASE WHEN _rank > 1 THEN 'duplicate_impression_id' END
           WHEN f._id IS NULL OR CAST(acc._day AS DATE) - CAST(f._idate AS DATE) > 1
             THEN 'orphan_action'
           WHEN acc.{uid} <> f._iu OR acc.{iid} <> f._ii THEN 'orphan_action'
           WHEN acc.event_time_ms - f._it < 0 THEN 'action_before_impression'
           WHEN acc.event_time_ms - f._it > {window_ms} THEN 'late_action'
      END AS _sreason
    FROM acc LEFT JOIN first_imp f ON acc.{imp} = f._id
    """


def build_duckdb(
    spec: FeatureSpec,
    out: str | Path,
    *,
    now_ms: int,
    future_tolerance_s: int = 3600,
    threads: int | None = None,
    memory_limit: str | None = None,
    progress: bool = True,
) -> dict:
    """Run the full build of ``spec`` in DuckDB into ``out``; return a summary (also written to
    ``out/summary.json``)."""
    import duckdb

    _check_scope(spec)
    ev = spec.source.events
    assert ev is not None
    t0 = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect(str(out / "work.duckdb"))
    if threads:
        con.execute(f"SET threads = {int(threads)}")
    if memory_limit:
        con.execute(f"SET memory_limit = {_lit(memory_limit)}")
    con.execute(f"SET temp_directory = {_lit(str(out / 'tmp'))}")
    con.execute("SET preserve_insertion_order = false")

    def step(name: str, sql: str) -> None:
        t = time.time()
        con.execute(sql)
        if progress:
            print(f"duckdb: {name} in {time.time() - t:.1f}s", flush=True)

    def spark_hash(col: pa.Array) -> pa.Array:
        return pa.array(spark_xxhash64_long(col.to_numpy(zero_copy_only=False)), pa.int64())

    con.create_function("spark_xxhash64", spark_hash, ["BIGINT"], "BIGINT", type="arrow")

    src = spec.source
    imp, typ = _q(ev.impression_id_column), _q(ev.type_column)
    step(
        "validate",
        "CREATE OR REPLACE TABLE validated AS " + _validated_sql(spec, now_ms, future_tolerance_s),
    )
    step("sessionize", "CREATE OR REPLACE TABLE staged AS " + _sessions_sql(spec))

    # --- sessions: the impression row + its attributed actions
    good_action = f"_sreason IS NULL AND {typ} <> {_lit(ev.impression_type)}"
    action_aggs = [
        f"coalesce(max(CASE WHEN {good_action} AND {typ} = {_lit(v)} THEN 1 END), 0) AS "
        f"{_q('action_' + name)}"
        for name, v in ev.actions.items()
    ]
    action_aggs += [
        f"coalesce(sum(CASE WHEN {good_action} AND {typ} = {_lit(ev.actions[name])} THEN "
        f"CAST({_q(col)} AS DOUBLE) END), 0.0) AS {_q('value_' + name)}"
        for name, col in ev.action_values.items()
    ]
    keep = ", ".join(f"any_value({_q(c)}) FILTER (WHERE _is_imp) AS {_q(c)}" for c in src.columns)
    step(
        "sessions",
        f"""CREATE OR REPLACE TABLE sessions AS
        SELECT {keep}, any_value(event_time_ms) FILTER (WHERE _is_imp) AS event_time_ms,
               any_value(_day) FILTER (WHERE _is_imp) AS date, {", ".join(action_aggs)}
        FROM (SELECT *, ({typ} = {_lit(ev.impression_type)} AND _sreason IS NULL) AS _is_imp
              FROM staged)
        GROUP BY {imp} HAVING bool_or(_is_imp)""",
    )

    # --- wide rows: ids, time, labels, raw feature values, side tables
    sel = [
        f"s.{_q(src.user_id)} AS user_id",
        f"s.{_q(src.item_id)} AS item_id",
        "s.event_time_ms",
        "s.date",
        f"spark_xxhash64(s.{imp}) AS example_id",
    ]
    for t in spec.tasks:
        if t.kind == TaskKind.BINARY:
            sel.append(f"CAST(s.{_q('action_' + t.column)} AS INTEGER) AS {_q('label_' + t.name)}")
        else:
            sel.append(f"s.{_q('value_' + t.column)} * {t.scale!r} AS {_q('label_' + t.name)}")
    for f in [*spec.context.categorical, *spec.context.dense]:
        sel.append(f"s.{_q(f.column)} AS {_q(f.name)}")
    joins = []
    for g, id_col in (("user", src.user_id), ("item", src.item_id)):
        group = getattr(spec, g)
        owner = group.column_owner()
        if not group.tables:
            for f in [*group.categorical, *group.dense]:
                sel.append(f"s.{_q(f.column)} AS {_q(f.name)}")
        for i, table in enumerate(group.tables):
            feats = [f for f in [*group.categorical, *group.dense] if owner.get(f.column) == i]
            if not feats:
                continue
            alias = f"{g}{i}"
            typed = ", ".join(
                f"TRY_CAST({_q(c)} AS {DUCK_TYPE[ty]}) AS {_q(c)}"
                for c, ty in table.columns.items()
            )
            con.execute(
                f"CREATE OR REPLACE TABLE {alias} AS SELECT {typed} FROM "
                f"read_parquet({_lit(table.path.removeprefix('file://'))})"
            )
            dup = con.execute(
                f"SELECT {_q(table.key)}, count(*) FROM {alias} GROUP BY 1 HAVING count(*) > 1 LIMIT 1"
            ).fetchone()
            if dup is not None:
                raise ValueError(
                    f"{table.path}: key column {table.key!r} value {dup[0]!r} appears {dup[1]} times"
                )
            joins.append(f"LEFT JOIN {alias} ON s.{_q(id_col)} = {alias}.{_q(table.key)}")
            sel += [f"{alias}.{_q(f.column)} AS {_q(f.name)}" for f in feats]
    step(
        "wide rows",
        f"CREATE OR REPLACE TABLE wide AS SELECT {', '.join(sel)} FROM sessions s {' '.join(joins)}",
    )

    # --- the fit on the training window
    sp = spec.split
    in_train = f"date <= {_lit(sp.train_end.isoformat())}"
    if sp.train_start:
        in_train += f" AND date >= {_lit(sp.train_start.isoformat())}"
    t_fit = time.time()
    vocab_sizes: dict[str, int] = {}
    targets: dict[str, str] = {}  # example column -> vocabulary table name
    for table, cols in vocab_tables(spec).items():
        max_vocab, min_count = _vocab_limits(spec, table)
        union = " UNION ALL ".join(
            f"SELECT CAST({_q(c)} AS VARCHAR) AS value FROM wide WHERE {in_train}" for c in cols
        )
        con.execute(
            f"""CREATE OR REPLACE TABLE {_q("vocab_" + table)} AS
            SELECT value, idx FROM (
              SELECT value, row_number() OVER (ORDER BY count(*) DESC, value ASC) AS idx
              FROM ({union}) WHERE value IS NOT NULL GROUP BY value HAVING count(*) >= {min_count}
            ) WHERE idx <= {max_vocab}"""
        )
        vocab_sizes[table] = (
            con.execute(f"SELECT count(*) FROM {_q('vocab_' + table)}").fetchone()[0] + 1
        )
        for c in cols:
            targets[c] = table

    def dense_pre(f) -> str:
        x = f"coalesce(CAST({_q(f.name)} AS DOUBLE), {float(f.fill)!r})"
        if f.transform in (DenseTransform.LOG1P, DenseTransform.LOG1P_STANDARDIZE):
            x = f"ln(1 + greatest({x}, 0.0))"
        return x

    # Row count, dense statistics, binary means and dwell minima in one scan (as Spark's fit).
    aggs = ["count(*)"]
    for f in spec.dense_features:
        aggs += [f"avg({dense_pre(f)})", f"stddev_pop({dense_pre(f)})"]
    for t in spec.tasks:
        label = _q(f"label_{t.name}")
        aggs.append(
            f"avg(CAST({label} AS DOUBLE))" if t.kind == TaskKind.BINARY else f"min({label})"
        )
    stats = list(con.execute(f"SELECT {', '.join(aggs)} FROM wide WHERE {in_train}").fetchone())
    n_train = stats.pop(0)
    if n_train == 0:
        raise ValueError("the training window holds no accepted rows: check split dates and source")
    dense: dict[str, tuple[float, float]] = {}
    for f in spec.dense_features:
        m, s = stats.pop(0), float(stats.pop(0) or 0.0)
        dense[f.name] = (float(m or 0.0), s if s > 1e-12 else 1.0)
    bins: dict[str, list[float]] = {}
    means: dict[str, float] = {}
    for t in spec.tasks:
        label = _q(f"label_{t.name}")
        if t.kind == TaskKind.BINARY:
            means[t.name] = float(stats.pop(0))
            continue
        vmin = stats.pop(0)
        assert t.n_bins is not None
        ranks = quantile_ranks(t.n_bins, n_train)
        rows = con.execute(
            f"""SELECT v FROM (SELECT {label} AS v, row_number() OVER (ORDER BY {label}) AS r
                FROM wide WHERE {in_train}) WHERE r IN ({", ".join(map(str, ranks))}) ORDER BY r"""
        ).fetchall()
        bins[t.name] = sorted({float(r[0]) for r in rows if r[0] > vmin})
        if not bins[t.name]:
            raise ValueError(f"tasks.{t.name}: the training window's values are constant; no bins")
        means[t.name] = float(
            con.execute(
                f"SELECT avg(({_bin_sql(label, bins[t.name])}) / {len(bins[t.name])}.0) "
                f"FROM wide WHERE {in_train}"
            ).fetchone()[0]
        )
    if progress:
        print(f"duckdb: fit in {time.time() - t_fit:.1f}s", flush=True)
    plan = kernel_plan(
        spec,
        Artifacts(
            spec_name=spec.name, spec_hash="", train_dates=[], train_rows=n_train,
            vocab_sizes=vocab_sizes, dense={}, bins=bins, global_means=means,
        ),
    )  # fmt: skip

    # --- transform: indices, dense, bins, task values
    feats = ["w.user_id", "w.item_id", "w.event_time_ms", "w.date", "w.example_id"]
    vjoins = []
    for c, table in targets.items():
        target = {"user_id": "user_idx", "item_id": "item_idx"}.get(c, c)
        a = f"v_{target}"
        vjoins.append(
            f"LEFT JOIN {_q('vocab_' + table)} {a} ON CAST(w.{_q(c)} AS VARCHAR) = {a}.value"
        )
        feats.append(f"coalesce({a}.idx, 0) AS {_q(target)}")
    for f in spec.dense_features:
        x = dense_pre(f).replace(_q(f.name), f"w.{_q(f.name)}")
        if f.transform in (DenseTransform.STANDARDIZE, DenseTransform.LOG1P_STANDARDIZE):
            m, s = dense[f.name]
            x = f"(({x}) - {m!r}) / {s!r}"
        feats.append(f"CAST({x} AS FLOAT) AS {_q(f.name)}")
    value_cols = {}
    for t in spec.tasks:
        feats.append(f"w.{_q('label_' + t.name)}")
        if t.kind == TaskKind.DWELL:
            b = _bin_sql(f"w.{_q('label_' + t.name)}", bins[t.name])
            feats.append(f"CAST({b} AS INTEGER) AS {_q(f'label_{t.name}_bin')}")
            value_cols[t.name] = f"CAST({_q(f'label_{t.name}_bin')} AS BIGINT)"
        else:
            value_cols[t.name] = f"CAST({_q('label_' + t.name)} AS BIGINT)"
    step(
        "transform",
        f"CREATE OR REPLACE TABLE rows AS SELECT {', '.join(feats)} FROM wide w {' '.join(vjoins)}",
    )

    # --- running features
    w_days = spec.pseudo_labels.window_days
    part = "PARTITION BY user_id ORDER BY event_time_ms"
    frames = {"all": f"({part} RANGE BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING)"}
    if w_days is not None:
        # the window's first instant: midnight (UTC) of day D - W + 1
        frames["win"] = (
            f"({part} RANGE BETWEEN (event_time_ms - (epoch_ms(CAST(date AS DATE)) - "
            f"{(w_days - 1) * DAY_MS})) PRECEDING AND 1 PRECEDING)"
        )
    run_cols = []
    for key, frame in frames.items():
        run_cols.append(f"count(*) OVER {frame} AS _n_{key}")
        run_cols += [f"sum({v}) OVER {frame} AS _s_{key}_{t}" for t, v in value_cols.items()]
    seq_filters = {}
    for s in spec.sequences:
        if s.when is None:
            cond = "TRUE"
        else:
            cond = f"{value_cols[s.when.task]} = {s.when.equals!r}"
        seq_filters[s.name] = cond
        run_cols.append(f"count(*) FILTER (WHERE {cond}) OVER {frames['all']} AS _c_{s.name}")
    step(
        "running sums",
        f"CREATE OR REPLACE TABLE running AS SELECT *, {', '.join(run_cols)} FROM rows",
    )
    for s in spec.sequences:
        con.execute(
            f"""CREATE OR REPLACE TABLE {_q("seqs_" + s.name)} AS
            SELECT user_id AS _u, list(item_idx ORDER BY event_time_ms, example_id) AS _items
            FROM rows WHERE {seq_filters[s.name]} GROUP BY user_id"""
        )

    def mean(key: str, t: str) -> str:
        return (
            f"CASE WHEN _n_{key} > 0 THEN CAST(_s_{key}_{t} AS DOUBLE) / "
            f"CAST(_n_{key} * {plan.divisors[t]} AS DOUBLE) ELSE {plan.fallback[t]!r} END"
        )

    split = (
        f"CASE WHEN date <= {_lit(sp.train_end.isoformat())} THEN 'train' "
        f"WHEN date <= {_lit(sp.valid_end.isoformat())} THEN 'valid' ELSE 'test' END"
    )
    if sp.train_start:
        split = (
            f"CASE WHEN date < {_lit(sp.train_start.isoformat())} THEN 'history' ELSE {split} END"
        )
    exprs: dict[str, str] = {"split": f"{split} AS split"}
    main = "win" if w_days is not None else "all"
    exprs["n_prev"] = f"_n_{main} AS n_prev"
    for t in value_cols:
        exprs[f"pl_{t}"] = f"{mean(main, t)} AS {_q('pl_' + t)}"
    if w_days is not None and spec.pseudo_labels.all_history:
        exprs["n_prev_all"] = "_n_all AS n_prev_all"
        for t in value_cols:
            exprs[f"pl_all_{t}"] = f"{mean('all', t)} AS {_q('pl_all_' + t)}"
    seq_joins = []
    for s in spec.sequences:
        a = f"q_{s.name}"
        c = f"_c_{s.name}"
        exprs[f"seq_{s.name}"] = (
            f"coalesce(list_slice({a}._items, greatest({c} - {s.max_len}, 0) + 1, {c}), "
            f"[]::BIGINT[]) AS {_q('seq_' + s.name)}"
        )
        seq_joins.append(f"LEFT JOIN {_q('seqs_' + s.name)} {a} ON r.user_id = {a}._u")
    select = [exprs.get(c, f"r.{_q(c)}") for c in example_columns(spec, plan)]
    examples = out / "examples"
    step(
        "examples",
        f"""COPY (SELECT {", ".join(select)} FROM running r {" ".join(seq_joins)})
        TO {_lit(str(examples))} (FORMAT parquet, PARTITION_BY (date), OVERWRITE_OR_IGNORE)""",
    )

    # --- rejected rows: validation and sessions, accounted to the file's date
    cols = ", ".join(_q(c) for c in src.columns)
    step(
        "rejected",
        f"""COPY (
          SELECT coalesce(_file_date, _day) AS date, _reason AS reason, filename AS source_file,
                 {cols} FROM validated WHERE _reason IS NOT NULL
          UNION ALL
          SELECT _day AS date, _sreason AS reason, filename AS source_file, {cols}
          FROM staged WHERE _sreason IS NOT NULL
        ) TO {_lit(str(out / "rejected.parquet"))} (FORMAT parquet)""",
    )
    n_in = con.execute("SELECT count(*) FROM validated").fetchone()[0]
    n_sessions = con.execute("SELECT count(*) FROM sessions").fetchone()[0]
    n_actions = con.execute(f"SELECT count(*) FROM staged WHERE {good_action}").fetchone()[0]
    reasons = dict(
        con.execute(
            "SELECT reason, count(*) FROM read_parquet(?) GROUP BY 1 ORDER BY 1",
            [str(out / "rejected.parquet")],
        ).fetchall()
    )
    n_rej = sum(reasons.values())
    if n_in != n_sessions + n_actions + n_rej:
        raise RuntimeError(
            f"row accounting broken: {n_in} rows in, {n_sessions} sessions + {n_actions} actions "
            f"accepted, {n_rej} rejected"
        )
    con.close()
    (out / "work.duckdb").unlink(missing_ok=True)
    summary = {
        "engine": f"duckdb {duckdb.__version__}",
        "rows_in": n_in,
        "sessions": n_sessions,
        "actions_attributed": n_actions,
        "rows_rejected": n_rej,
        "rejected_by_reason": reasons,
        "train_rows": n_train,
        "vocab_sizes": vocab_sizes,
        "dense": {k: {"mean": m, "std": s} for k, (m, s) in dense.items()},
        "bin_boundaries": bins,
        "global_means": means,
        "seconds": round(time.time() - t0, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _bin_sql(col: str, boundaries: list[float]) -> str:
    """Number of boundaries <= value, as `pipelines.artifacts.bin_index`."""
    return "(" + " + ".join(f"CASE WHEN {col} >= {b!r} THEN 1 ELSE 0 END" for b in boundaries) + ")"


# --------------------------------------------------------------------------- comparison
FLOAT_RTOL = 1e-9


def compare_examples(spark_examples: str | Path, duckdb_examples: str | Path) -> dict:
    """Compare the Spark build's examples (a Delta table) with the DuckDB build's (Parquet),
    row by row on ``example_id``. Integer, string and list columns must be equal; float64
    columns within ``FLOAT_RTOL`` relative and float32 columns within one float32 ulp (the
    statistics behind them are sums taken in a different order).

    Returns ``{"equal", "rows_spark", "rows_duckdb", "rows_compared", "mismatches"}`` where a
    mismatch names the column, how many rows differ, and the first such row's two values.
    """
    import pyarrow.compute as pc
    import pyarrow.dataset as ds
    from deltalake import DeltaTable

    left = DeltaTable(str(spark_examples)).to_pyarrow_dataset().to_table()
    right = ds.dataset(str(duckdb_examples), format="parquet", partitioning="hive").to_table()
    right = right.set_column(
        right.schema.get_field_index("date"), "date", right["date"].cast(pa.string())
    )
    res: dict = {"rows_spark": left.num_rows, "rows_duckdb": right.num_rows, "mismatches": {}}
    lcols, rcols = set(left.column_names), set(right.column_names)
    if lcols != rcols:
        res["mismatches"]["_columns"] = {
            "only_spark": sorted(lcols - rcols),
            "only_duckdb": sorted(rcols - lcols),
        }
    ids_l, ids_r = left["example_id"], right["example_id"]
    only_l = left.num_rows - pc.sum(pc.is_in(ids_l, value_set=ids_r)).as_py()
    only_r = right.num_rows - pc.sum(pc.is_in(ids_r, value_set=ids_l)).as_py()
    if only_l or only_r or pc.count_distinct(ids_l).as_py() != left.num_rows:
        res["mismatches"]["_example_id"] = {"only_spark": only_l, "only_duckdb": only_r}
        left = left.filter(pc.is_in(left["example_id"], value_set=ids_r))
        right = right.filter(pc.is_in(right["example_id"], value_set=ids_l))
    left = left.take(pc.sort_indices(left["example_id"]))
    right = right.take(pc.sort_indices(right["example_id"]))
    ids = left["example_id"].to_numpy()
    for c in [c for c in left.column_names if c in rcols and c != "example_id"]:
        a, b = left[c].combine_chunks(), right[c].combine_chunks()
        if pa.types.is_list(a.type) or pa.types.is_large_list(a.type):
            la = pc.list_value_length(a).to_numpy(zero_copy_only=False)
            lb = pc.list_value_length(b).to_numpy(zero_copy_only=False)
            bad = la != lb
            if not bad.any():
                fa = pc.list_flatten(a).to_numpy(zero_copy_only=False)
                fb = pc.list_flatten(b).to_numpy(zero_copy_only=False)
                row = np.repeat(np.arange(len(la)), la)
                bad = np.zeros(len(la), dtype=bool)
                bad[row[fa != fb]] = True
        elif pa.types.is_floating(a.type):
            av = a.to_numpy(zero_copy_only=False).astype(np.float64)
            bv = b.cast(pa.float64()).to_numpy(zero_copy_only=False)
            if pa.types.is_float32(a.type):
                tol = np.spacing(np.abs(av).astype(np.float32)).astype(np.float64)
            else:
                tol = FLOAT_RTOL * np.abs(av)
            bad = ~(np.abs(av - bv) <= tol) & ~(np.isnan(av) & np.isnan(bv))
        else:
            bad = ~pc.fill_null(pc.equal(a, b.cast(a.type)), False).to_numpy(zero_copy_only=False)
            bad &= ~(
                pc.is_null(a).to_numpy(zero_copy_only=False)
                & pc.is_null(b).to_numpy(zero_copy_only=False)
            )
        n_bad = int(bad.sum())
        if n_bad:
            i = int(np.flatnonzero(bad)[0])
            res["mismatches"][c] = {
                "rows": n_bad,
                "example_id": int(ids[i]),
                "spark": a[i].as_py(),
                "duckdb": b[i].as_py(),
            }
    res["rows_compared"] = left.num_rows
    res["equal"] = not res["mismatches"]
    return res


def compare_rejected(spark_rejected: str | Path, duckdb_rejected: str | Path) -> dict:
    """Rejected rows per (date, reason) in both builds; ``equal`` when every count agrees."""
    from collections import Counter

    import pyarrow.parquet as pq
    from deltalake import DeltaTable

    lt = DeltaTable(str(spark_rejected)).to_pyarrow_dataset().to_table(columns=["date", "reason"])
    rt = pq.read_table(str(duckdb_rejected), columns=["date", "reason"])
    lc = Counter(zip(lt["date"].to_pylist(), lt["reason"].to_pylist(), strict=True))
    rc = Counter(zip(rt["date"].to_pylist(), rt["reason"].to_pylist(), strict=True))
    diff = {
        f"{d} {r}": {"spark": lc[(d, r)], "duckdb": rc[(d, r)]}
        for d, r in lc | rc
        if lc[(d, r)] != rc[(d, r)]
    }
    return {"equal": not diff, "rows": sum(lc.values()), "differences": diff}
