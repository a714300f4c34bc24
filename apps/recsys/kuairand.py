"""KuaiRand-Pure (Gao et al., CIKM 2022, arXiv 2208.08696): Kuaishou's multi-behaviour log as model rows.

Reads ``<data_dir>/kuairand_pure/`` (its ``SOURCE.txt`` is the spec). A model row is one impression of the
interaction table joined with

* the user's static features (``user_features.parquet``),
* the video's *basic* features (``video_features_basic_pure.csv``; the statistic columns of
  ``item_features.parquet`` are month-wide aggregates that include later days, so they are not used),
* the user's watch history before the impression: the ids of the videos the user clicked (``is_click = 1``)
  at a ``time_ms`` strictly earlier than the row's own ``time_ms``, preceded by the pre-window history of
  ``user_sequences.parquet`` (all before 2022-04-25), oldest first, the last ``history_len`` kept. An
  impression never sees itself or anything at or after its own time, whatever its ``date`` says (``date``
  and ``time_ms`` come from different clocks near midnight).

Outcome columns never become features: the eight labels, ``play_time_ms``, ``profile_stay_time``,
``comment_stay_time`` and the repository's derived ``watch_ratio``, ``finish``, ``like``, ``long_watch``,
``is_positive`` (:data:`KUAIRAND_LEAKY`). The request a served model takes is a raw interaction-table row;
only :data:`REQUEST_COLUMNS` are read from it.

Split (SOURCE.txt, by ``date``, inclusive): train 2022-04-25..05-02, validation 05-03..05-04, test
05-05..05-06.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from apps.datadir import data_dir
from apps.recsys.data import MultiTaskDataModule
from apps.recsys.schema import FeatureSchema, read_table

log = logging.getLogger(__name__)

KUAIRAND_FOLDER = "kuairand_pure"
KUAIRAND_TASKS = (
    "is_click", "long_view", "is_like", "is_follow", "is_comment", "is_forward", "is_hate",
    "is_profile_enter",
)  # fmt: skip
DEFAULT_TASK_GROUPS: dict[str, list[str]] = {
    "watch": ["is_click", "long_view"],
    "interaction": ["is_like", "is_follow", "is_comment", "is_forward", "is_profile_enter"],
    "negative": ["is_hate"],
}
# outcomes of the impression (SOURCE.txt "LABELS / OUTCOMES" and "DERIVED BY THE REPO"): never features
KUAIRAND_LEAKY = (
    *KUAIRAND_TASKS, "play_time_ms", "profile_stay_time", "comment_stay_time", "watch_ratio", "finish",
    "like", "long_watch", "is_positive",
)  # fmt: skip
REQUEST_COLUMNS = ("user_id", "video_id", "time_ms", "date", "hourmin", "tab")
SPLIT_DATES = {"train": (20220425, 20220502), "val": (20220503, 20220504), "test": (20220505, 20220506)}

USER_CATEGORICAL = (
    "user_active_degree", "is_live_streamer", "is_video_author", "follow_user_num_range",
    "fans_user_num_range", "friend_user_num_range", "register_days_range",
    *(f"onehot_feat{i}" for i in range(18)),
)  # fmt: skip
USER_NUMERIC = ("follow_user_num", "fans_user_num", "friend_user_num", "register_days")
VIDEO_CATEGORICAL = (
    "author_id", "video_type", "upload_type", "music_type", "tag", "server_width", "server_height",
    "duration_known",
)  # fmt: skip
CONTEXT_CATEGORICAL = ("user_id", "video_id", "tab", "hour", "weekday")
NUMERIC = (*USER_NUMERIC, "video_duration", "freshness_days", "history_count")
LOG1P = (*USER_NUMERIC, "video_duration", "history_count")
HISTORY_COLUMN = "watch_history"
_TIME_BITS = 42  # history key = user_id << 42 | time_ms (time_ms < 2**42 until the year 2109)


def check_task_groups(groups: Mapping[str, Sequence[str]], tasks: Sequence[str]) -> list[list[int]]:
    """Task-group names -> HoME categories (task indices per group), checked against the task list.

    Raises:
        ValueError: a group names a task that is not in ``tasks``, a task is in no group or in two, or a group
            is empty.
    """
    tasks = list(tasks)
    seen: dict[str, str] = {}
    cats = []
    for g, members in groups.items():
        if not members:
            raise ValueError(f"task group {g!r} is empty")
        unknown = [t for t in members if t not in tasks]
        if unknown:
            raise ValueError(f"task group {g!r} names {unknown}, which are not among the tasks {tasks}")
        for t in members:
            if t in seen:
                raise ValueError(f"task {t!r} is in two task groups ({seen[t]!r} and {g!r})")
            seen[t] = g
        cats.append([tasks.index(t) for t in members])
    missing = [t for t in tasks if t not in seen]
    if missing:
        raise ValueError(f"tasks {missing} are in no task group; groups: {dict(groups)}")
    return cats


def _read_parquet(path: os.PathLike | str) -> pd.DataFrame:
    # plain numpy dtypes (SOURCE.txt: pandas would restore nullable Int64/Float64/string from the metadata)
    return pq.read_table(path).to_pandas(ignore_metadata=True)


@dataclass
class KuaiRandJoiner:
    """Raw interaction rows -> model rows: user features, video basic features, watch history.

    Fitted once from the shipped tables; the served predictor holds it, so serving joins exactly as training.

    Attributes:
        users: user features indexed by ``user_id``.
        videos: video basic features indexed by ``video_id`` (``upload_day`` = upload date as YYYYMMDD).
        hist_keys: ``(N_events,)`` sorted ``user_id << 42 | time_ms`` of the history events.
        hist_videos: ``(N_events,)`` the clicked video of each event.
        history_len: ids kept per row (the most recent).
        example: a few raw request rows (the served model's input example).
    """

    users: pd.DataFrame
    videos: pd.DataFrame
    hist_keys: np.ndarray
    hist_videos: np.ndarray
    history_len: int
    example: pd.DataFrame

    request_columns: tuple[str, ...] = REQUEST_COLUMNS

    @classmethod
    def build(
        cls, folder: os.PathLike | str, interactions: pd.DataFrame, *, history_len: int
    ) -> KuaiRandJoiner:
        """The joiner of the shipped tables; history events are the clicks of ``interactions`` plus the
        pre-window sequences."""
        folder = os.fspath(folder)
        users = _read_parquet(os.path.join(folder, "user_features.parquet")).set_index("user_id")
        videos = read_table(os.path.join(folder, "video_features_basic_pure.csv"))
        videos = videos.set_index("video_id")
        videos["upload_day"] = pd.to_datetime(videos["upload_dt"], format="%Y-%m-%d").dt.strftime("%Y%m%d")
        videos["upload_day"] = videos["upload_day"].astype(np.int64)
        for c in ("music_type", "server_width", "server_height", "video_duration"):
            videos[c] = pd.to_numeric(videos[c].replace("", np.nan))
        videos["tag"] = videos["tag"].replace("", "unknown")
        seqs = _read_parquet(os.path.join(folder, "user_sequences.parquet"))
        lens = seqs["watch_seq"].map(len).to_numpy()
        pre_user = np.repeat(seqs["user_id"].to_numpy(np.int64), lens)
        # oldest -> newest, spaced 1 ms apart and ending at last_time_ms: keeps their order, all before 04-25
        back = np.concatenate([np.arange(n - 1, -1, -1) for n in lens]) if len(lens) else np.empty(0)
        pre_time = np.repeat(seqs["last_time_ms"].to_numpy(np.int64), lens) - back.astype(np.int64)
        pre_video = np.concatenate(seqs["watch_seq"].tolist()).astype(np.int64)
        clicked = interactions[interactions["is_click"].to_numpy() == 1]
        user = np.concatenate([pre_user, clicked["user_id"].to_numpy(np.int64)])
        time = np.concatenate([pre_time, clicked["time_ms"].to_numpy(np.int64)])
        video = np.concatenate([pre_video, clicked["video_id"].to_numpy(np.int64)])
        keys = (user << _TIME_BITS) | time
        order = np.argsort(keys, kind="stable")
        example = interactions[list(REQUEST_COLUMNS)].tail(5).reset_index(drop=True)
        return cls(
            users=users, videos=videos, hist_keys=keys[order], hist_videos=video[order],
            history_len=history_len, example=example,
        )  # fmt: skip

    def input_example(self) -> pd.DataFrame:
        return self.example.copy()

    def _ints(self, df: pd.DataFrame, c: str, source: str) -> np.ndarray:
        v = df[c]
        x = pd.to_numeric(v, errors="coerce")
        bad = x.isna() | (x != np.floor(x))
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise ValueError(f"{source}: column {c!r} row {i + 1}: expected an integer, got {v.iloc[i]!r}")
        return x.to_numpy(dtype=np.int64)

    def history(self, user: np.ndarray, time: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
        """Per row, the last ``history_len`` clicked video ids with ``time_ms`` strictly before the row's
        (oldest first), and the count of all such clicks."""
        q = (user << _TIME_BITS) | time
        end = np.searchsorted(self.hist_keys, q, side="left")  # events of users < u, or of u before t
        start = np.searchsorted(self.hist_keys, user << _TIME_BITS, side="left")  # u's first event
        count = end - start  # (N,)
        lens = np.minimum(count, self.history_len)
        total = int(lens.sum())
        within = np.arange(total) - np.repeat(np.cumsum(lens) - lens, lens)  # (total,) position in its row
        flat = self.hist_videos[np.repeat(end - lens, lens) + within]
        return np.split(flat, np.cumsum(lens)[:-1]), count

    def join(self, df: pd.DataFrame, *, source: str = "request", labels: Sequence[str] = ()) -> pd.DataFrame:
        """Model rows of raw interaction rows: reads only :data:`REQUEST_COLUMNS` (plus ``labels``, copied).

        Raises:
            ValueError: a missing request column, a non-integer value, an unknown user or video, a bad date or
                hour; the message names the column and the 1-based row.
        """
        missing = [c for c in self.request_columns if c not in df.columns]
        if missing:
            raise ValueError(
                f"{source}: missing column(s) {missing}; a KuaiRand request is a raw interaction-table row "
                f"with at least {list(self.request_columns)}"
            )
        x = {c: self._ints(df, c, source) for c in self.request_columns}
        for c, table in (("user_id", self.users), ("video_id", self.videos)):
            known = np.isin(x[c], table.index.to_numpy())
            if not known.all():
                i = int(np.flatnonzero(~known)[0])
                raise ValueError(f"{source}: {c} {x[c][i]} (row {i + 1}) is not in the KuaiRand {c} table")
        day = pd.to_datetime(pd.Series(x["date"]).astype(str), format="%Y%m%d", errors="coerce")
        if day.isna().any():
            i = int(np.flatnonzero(day.isna().to_numpy())[0])
            raise ValueError(f"{source}: date {x['date'][i]} (row {i + 1}) is not a YYYYMMDD date")
        hm = x["hourmin"]
        if ((hm < 0) | (hm > 2359) | (hm % 100 > 59)).any():
            i = int(np.flatnonzero((hm < 0) | (hm > 2359) | (hm % 100 > 59))[0])
            raise ValueError(f"{source}: hourmin {hm[i]} (row {i + 1}) is not an HHMM time")
        out = pd.DataFrame({"user_id": x["user_id"], "video_id": x["video_id"], "tab": x["tab"]})
        out["hour"] = hm // 100
        out["weekday"] = day.dt.weekday.to_numpy()
        u = self.users.loc[x["user_id"]].reset_index(drop=True)
        for c in (*USER_CATEGORICAL, *USER_NUMERIC):
            out[c] = u[c].to_numpy()
        v = self.videos.loc[x["video_id"]].reset_index(drop=True)
        for c in (
            "author_id",
            "video_type",
            "upload_type",
            "music_type",
            "tag",
            "server_width",
            "server_height",
        ):
            out[c] = v[c].to_numpy()
        dur = v["video_duration"].to_numpy(dtype=np.float64)
        out["duration_known"] = np.isfinite(dur).astype(np.int64)
        out["video_duration"] = np.nan_to_num(dur, nan=0.0)
        upload = pd.to_datetime(v["upload_day"].astype(str), format="%Y%m%d")
        out["freshness_days"] = (day.reset_index(drop=True) - upload).dt.days.to_numpy(dtype=np.float64)
        seqs, count = self.history(x["user_id"], x["time_ms"])
        out[HISTORY_COLUMN] = pd.Series(seqs, dtype=object)
        out["history_count"] = count.astype(np.float64)
        for c in labels:
            out[c] = df[c].to_numpy()
        return out


def kuairand_schema(
    tasks: Sequence[str], *, history: bool, history_len: int, min_count: int
) -> FeatureSchema:
    """The KuaiRand feature schema: context, user and video categoricals, numeric counts, watch history."""
    return FeatureSchema(
        categorical=(*CONTEXT_CATEGORICAL, *USER_CATEGORICAL, *VIDEO_CATEGORICAL),
        numeric=NUMERIC, log1p=LOG1P, labels=tuple(tasks), group="user_id", min_count=min_count,
        sequences={HISTORY_COLUMN: "video_id"} if history else {}, max_seq_len=history_len,
    )  # fmt: skip


class KuaiRandDataModule(MultiTaskDataModule):
    """KuaiRand-Pure multi-task data: interactions + user features + video basic features + watch history.

    The split is SOURCE.txt's, by ``date``: train 2022-04-25..05-02, validation 05-03..05-04, test
    05-05..05-06. The watch history of a row holds only clicks strictly before its ``time_ms``; how the model
    pools it (DIN target attention or mean) is the model's ``seq_pooling``.

    Args:
        data_dir: folder holding ``kuairand_pure/`` (default: ``apps.datadir.data_dir()``).
        tasks: label columns, one task each (any of is_click, long_view, is_like, is_follow, is_comment,
            is_forward, is_hate, is_profile_enter), in task order.
        task_groups: task-group name -> its tasks, HoME's categories (every task in exactly one group); the
            default groups watch (is_click, long_view), interaction (is_like, is_follow, is_comment,
            is_forward, is_profile_enter) and negative (is_hate).
        history: give the model the user's watch history as a sequence feature.
        history_len: the most recent clicked videos kept per row.
        min_count: category values seen fewer times on train map to the out-of-vocabulary index.
        max_train_rows: keep a seeded random sample of this many train rows (fast tests); None = all.
        max_eval_rows: likewise for validation and test.
        seed: seed of the row samples.
        predict_path: a file of raw interaction-table rows (CSV or Parquet, at least user_id, video_id,
            time_ms, date, hourmin, tab) scored by ``moekit recsys predict``; default: the test split.
        batch_size: train batch size.
        eval_batch_size: validation/test/predict batch size.
    """

    def __init__(
        self,
        *,
        data_dir: str | None = None,
        tasks: list[str] | None = None,
        task_groups: dict[str, list[str]] | None = None,
        history: bool = True,
        history_len: int = 50,
        min_count: int = 1,
        max_train_rows: int | None = None,
        max_eval_rows: int | None = None,
        seed: int = 0,
        predict_path: str | None = None,
        batch_size: int = 2048,
        eval_batch_size: int = 16384,
    ) -> None:
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size, predict_path=predict_path)
        self.save_hyperparameters(ignore=["predict_path"])  # see MultiTaskDataModule
        self.tasks = list(tasks or KUAIRAND_TASKS)
        unknown = [t for t in self.tasks if t not in KUAIRAND_TASKS]
        if unknown:
            raise ValueError(
                f"KuaiRand tasks {unknown} are not label columns; choose from {list(KUAIRAND_TASKS)}"
            )
        groups = task_groups
        if groups is None:  # the default groups, restricted to the chosen tasks
            groups = {g: [t for t in ts if t in self.tasks] for g, ts in DEFAULT_TASK_GROUPS.items()}
            groups = {g: ts for g, ts in groups.items() if ts}
        self.task_groups = dict(groups)
        self.task_categories = check_task_groups(self.task_groups, self.tasks)
        self.joiner: KuaiRandJoiner | None = None

    @property
    def folder(self) -> str:
        return os.fspath(data_dir(self.hparams.data_dir) / KUAIRAND_FOLDER)

    def schema(self) -> FeatureSchema:
        hp = self.hparams
        return kuairand_schema(
            self.tasks, history=hp.history, history_len=hp.history_len, min_count=hp.min_count
        )

    def raw_interactions(self) -> pd.DataFrame:
        path = os.path.join(self.folder, "interactions.parquet")
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{path} not found: KuaiRand-Pure is read from <data_dir>/{KUAIRAND_FOLDER}/ (see its "
                "SOURCE.txt); set data.init_args.data_dir or MOEKIT_DATA"
            )
        return _read_parquet(path)

    def load_frames(self) -> dict[str, tuple[pd.DataFrame, str]]:
        hp = self.hparams
        raw = self.raw_interactions()
        self.joiner = KuaiRandJoiner.build(self.folder, raw, history_len=hp.history_len)
        rng = np.random.default_rng(hp.seed)
        frames = {}
        for name, (lo, hi) in SPLIT_DATES.items():
            part = raw[(raw["date"] >= lo) & (raw["date"] <= hi)]
            cap = hp.max_train_rows if name == "train" else hp.max_eval_rows
            if cap and len(part) > cap:
                part = part.iloc[np.sort(rng.permutation(len(part))[:cap])]
            src = f"{self.folder}/interactions.parquet [{name}: date {lo}..{hi}]"
            frames[name] = (self.joiner.join(part.reset_index(drop=True), source=src, labels=self.tasks), src)
        log.info("KuaiRand rows: %s", {k: len(v[0]) for k, v in frames.items()})
        return frames

    def load_predict_frame(self) -> tuple[pd.DataFrame, str] | None:
        path = self.predict_path
        if not path:
            return None
        if self.joiner is None:
            raise RuntimeError("KuaiRandDataModule: setup() must run before the predict file is read")
        return self.joiner.join(read_table(path), source=str(path)), str(path)
