"""S3 listings with what the content version needs (ETag, version id), which pyarrow's S3 listing
does not give: storage.list_versions and storage.file_version call here for s3:// URIs. Clients get
the same endpoint, region, retries and timeouts as storage's pyarrow filesystem.
"""
from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from promptad.data.storage import (
    S3_CONNECT_TIMEOUT_S,
    S3_MAX_ATTEMPTS,
    S3_REQUEST_TIMEOUT_S,
    VERSIONED_SCHEMA,
    _extension_mask,
    _s3_endpoint,
    _s3_region,
)


def s3_version(etag: str, version_id: str | None) -> str:
    """Content version of an S3 object: its ETag, plus ":<version id>" where the bucket is versioned."""
    etag = etag.strip('"')
    return f"{etag}:{version_id}" if version_id and version_id != "null" else etag



def s3fs_for(version_aware: bool):
    """An s3fs filesystem with the same endpoint, region and retries as pyarrow's (listings with ETags).

    No listing cache: a nightly job lists once, and tests overwrite objects between listings."""
    import s3fs

    return s3fs.S3FileSystem(
        client_kwargs={"endpoint_url": _s3_endpoint(), "region_name": _s3_region()},
        config_kwargs={"retries": {"max_attempts": S3_MAX_ATTEMPTS, "mode": "standard"},
                       "connect_timeout": S3_CONNECT_TIMEOUT_S, "read_timeout": S3_REQUEST_TIMEOUT_S},
        version_aware=version_aware, use_listings_cache=False, skip_instance_cache=True)


def bucket_versioned(bucket: str) -> bool:
    """Whether the bucket has versioning enabled; False when the role may not ask (ETags still
    version the content, only identical re-uploads then keep their rows)."""
    try:
        return bool(s3fs_for(False).is_bucket_versioned(bucket))
    except (OSError, ValueError):  # PermissionError (AccessDenied) is an OSError
        return False


def make_client():
    """A botocore S3 client with the same endpoint, region, retries and timeouts as pyarrow's, for
    paged listings (ListObjectsV2 / ListObjectVersions; pyarrow's S3 listing has no ETag)."""
    import botocore.session
    from botocore.config import Config

    return botocore.session.get_session().create_client(
        "s3", endpoint_url=_s3_endpoint(), region_name=_s3_region(),
        config=Config(retries={"max_attempts": S3_MAX_ATTEMPTS, "mode": "standard"},
                      connect_timeout=S3_CONNECT_TIMEOUT_S, read_timeout=S3_REQUEST_TIMEOUT_S))


LIST_PAGE = 1000  # keys per listing request (S3's maximum)


def pages(bucket: str, prefix: str, versioned: bool):
    """(keys, sizes, versions) per listing page of at most 1,000 objects: only one page of
    Python objects is alive at a time. In a versioned bucket, the latest version of each key
    (a key whose latest version is a delete marker is not listed)."""
    client = make_client()
    paging = {"Bucket": bucket, "Prefix": prefix, "PaginationConfig": {"PageSize": LIST_PAGE}}
    if versioned:
        for page in client.get_paginator("list_object_versions").paginate(**paging):
            latest = [v for v in page.get("Versions", ()) if v.get("IsLatest")]
            yield ([v["Key"] for v in latest], [int(v["Size"]) for v in latest],
                   [s3_version(v.get("ETag", ""), v.get("VersionId")) for v in latest])
    else:
        for page in client.get_paginator("list_objects_v2").paginate(**paging):
            objects = page.get("Contents", ())
            yield ([o["Key"] for o in objects], [int(o["Size"]) for o in objects],
                   [s3_version(o.get("ETag", ""), None) for o in objects])


def list_versions(uri: str, path: str, extensions: set[str] | None = None) -> pa.Table:
    """ListObjectsV2, or ListObjectVersions (latest versions only) in a versioned bucket, page by
    page: each page becomes Arrow arrays (filtered by `extensions`) before the next is fetched, so
    10,000,000 objects cost their Arrow columns (~100 bytes each), not 10,000,000 Python dicts.
    Keys come in S3's order (UTF-8 binary, what sorting the URIs gives)."""
    bucket, _, key = path.partition("/")
    versioned = bucket_versioned(bucket)
    prefix = key.rstrip("/") + "/" if key else ""
    head = f"s3://{bucket}/"
    parts = []
    for keys, sizes, versions in pages(bucket, prefix, versioned):
        page = pa.table([pc.binary_join_element_wise(head, pa.array(keys, pa.string()), ""),
                         pa.array(sizes, pa.int64()), pa.array(versions, pa.string())], schema=VERSIONED_SCHEMA)
        parts.append(page.filter(_extension_mask(page["uri"], extensions)))
    return pa.concat_tables(parts) if parts else VERSIONED_SCHEMA.empty_table()  # one chunk a page, no copy


def file_version(uri: str, path: str) -> tuple[int, str]:
    """(size, version) of one object, as list_versions gives it; FileNotFoundError if missing."""
    versioned = bucket_versioned(path.split("/", 1)[0])
    try:
        info = s3fs_for(versioned).info(path)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"no such object: {uri}") from e
    return int(info["size"]), s3_version(info.get("ETag", ""), info.get("VersionId") if versioned else None)
