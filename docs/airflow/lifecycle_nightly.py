"""Example Airflow DAG: the nightly run as one task per day (Airflow is not a dependency of
this project; copy this file into your DAGs folder and adjust the paths).

The chain is one command (`python -m jobs.nightly`): it skips every step whose output for the
date exists, so Airflow retries and backfills are safe, and a failed step leaves the earlier
outputs in place. `{{ ds }}` is the logical date: the day whose logs are complete.
"""

from __future__ import annotations

import datetime as dt

from airflow import DAG
from airflow.operators.bash import BashOperator

PROJECT = "/opt/lifecycle-mtl"  # a checkout with its .venv (bash .ci/setup.sh)

with DAG(
    dag_id="lifecycle_mtl_nightly",
    schedule="30 2 * * *",  # 02:30 every night, after the day's logs have landed
    start_date=dt.datetime(2022, 4, 25),
    catchup=True,  # backfill day by day: the feature chain needs yesterday's state
    max_active_runs=1,  # one night at a time, in date order
    default_args={
        "retries": 2,
        "retry_delay": dt.timedelta(minutes=15),
        "depends_on_past": True,
    },
) as dag:
    BashOperator(
        task_id="nightly",
        cwd=PROJECT,
        bash_command=(
            ".venv/bin/python -m jobs.nightly --date {{ ds }} --nproc 2 --warm-start "
            "--set-pipeline spark.master=yarn "
            "--set-train mlflow.tracking_uri=http://mlflow.internal:5000"
        ),
    )
