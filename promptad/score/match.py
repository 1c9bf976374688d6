"""Which row of the scoring output is each input's current one, for 10,000,000 of each on a driver
with 2 GB: plan.make_plan and output.verify. Pure pyarrow + numpy.

A hash pass over 10,000,000 strings holds ~700 MB of hash table, and the obvious plan took four
of them (the manifest's duplicate check, two to find superseded rows, the lookup). Here the
image_ids of both sides are split into MATCH_PARTS partitions by a hash of their bytes (`buckets`)
and each partition is matched with one dictionary encoding of both sides (each image_id an
integer code), then integer work; only the rows of image_ids held more than once (a killed run's
leftovers) are ordered, by output.newest_rows.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from promptad.score.output import newest_rows

MATCH_PARTS = 8  # image_ids are matched in this many hash partitions, one at a time (see match)


def buckets(ids: pa.ChunkedArray, parts: int) -> np.ndarray:
    """A partition number in [0, parts) per string, from its bytes alone (the same string gets the
    same number in any column): a weighted byte sum per string over Arrow's buffers, no Python
    object per row."""
    out = []
    for chunk in ids.chunks:
        if len(chunk) == 0:
            continue
        offsets = np.frombuffer(chunk.buffers()[1], np.int32)[chunk.offset:chunk.offset + len(chunk) + 1]
        lengths = np.diff(offsets).astype(np.uint64)
        mixed = lengths * np.uint64(7)
        end = int(offsets[-1])
        if end > 0:
            data = np.frombuffer(chunk.buffers()[2], np.uint8)[:end]  # the buffer can run past the last string
            full = lengths > 0
            # over the non-empty strings only: each segment then ends where its string does
            total = np.add.reduceat(data, offsets[:-1][full], dtype=np.uint64)
            last = data[offsets[1:][full] - 1].astype(np.uint64) * np.uint64(29)
            mixed[full] += total + last
        out.append((mixed % np.uint64(parts)).astype(np.int8))
    return np.concatenate(out) if out else np.zeros(0, np.int8)


def _match_part(held: pa.ChunkedArray, wanted: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray, bool]:
    """Within one partition: one dictionary encoding of both columns (each image_id an integer
    code), then integer work. Returns, per row of `held`, whether its image_id occurs once there;
    per row of `wanted`, the index in `held` of the row with its image_id (-1: none; for an
    image_id held several times, any of them: the caller picks the current one); whether `wanted`
    repeats one."""
    n = len(held)
    encoded = pc.dictionary_encode(pa.chunked_array(list(held.chunks) + list(wanted.chunks), pa.string()))
    codes = np.concatenate([c.indices.to_numpy() for c in encoded.chunks]) if encoded.num_chunks else \
        np.zeros(0, np.int32)
    size = len(encoded.chunks[-1].dictionary) if encoded.num_chunks else 0
    del encoded
    held_codes, wanted_codes = codes[:n], codes[n:]
    repeats = bool(wanted_codes.size) and int(np.bincount(wanted_codes, minlength=size).max()) > 1
    single = np.bincount(held_codes, minlength=size)[held_codes] == 1
    position = np.full(size, -1, np.int64)
    position[held_codes] = np.arange(n)  # for a repeated code, one of its rows
    return single, position[wanted_codes], repeats


def match(rows: pa.Table, ids: pa.ChunkedArray, parts: int = MATCH_PARTS) -> tuple[np.ndarray, pa.Table, bool]:
    """For each of `ids`, the index in `rows` of its current row (-1: none); the superseded rows;
    whether `ids` repeats one.

    A hash pass over 10,000,000 strings holds ~700 MB of hash table: the image_ids are split into
    `parts` partitions by a hash of their bytes and matched one partition at a time, each with one
    dictionary encoding of both sides (this replaces the manifest's duplicate check, newest_rows'
    two passes and the lookup). Only the rows of image_ids that occur more than once in `rows` go
    through newest_rows (a killed run's, a few thousand at most)."""
    n = rows.num_rows
    held_part, wanted_part = buckets(rows["image_id"], parts), buckets(ids, parts)
    where = np.full(len(ids), -1, np.int64)
    single = np.ones(n, bool)
    repeats = False
    for part in range(parts):
        held_rows = np.flatnonzero(held_part == part)
        wanted_rows = np.flatnonzero(wanted_part == part)
        one, found, twice = _match_part(rows["image_id"].take(pa.array(held_rows)), ids.take(pa.array(wanted_rows)))
        single[held_rows] = one
        if held_rows.size:
            where[wanted_rows] = np.where(found >= 0, held_rows[np.maximum(found, 0)], -1)
        repeats = repeats or twice
    superseded = rows.slice(0, 0)
    if not single.all():
        several = np.flatnonzero(~single)
        sub = rows.take(pa.array(several)).append_column("_row", pa.array(several))
        current, superseded = newest_rows(sub)
        chosen = pa.table({"image_id": current["image_id"], "_row": current["_row"]})
        # each input whose image_id is held several times points at its current row
        lookup = pc.index_in(ids, value_set=chosen["image_id"])
        hit = pc.is_valid(lookup).to_numpy(zero_copy_only=False)
        picks = chosen["_row"].to_numpy()[pc.fill_null(lookup, 0).to_numpy()]
        where = np.where(hit, picks, where)
        superseded = superseded.drop_columns(["_row"])
    return where, superseded, repeats
