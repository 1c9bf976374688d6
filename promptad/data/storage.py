"""URIs in one place: local paths, file:// and s3://bucket/key, all through pyarrow.fs.

Every other module reads and writes data through these functions, so that the same code runs
on a laptop folder and on an S3 archive, and S3 retries and endpoint settings live here only.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import posixpath
import re
import threading
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from promptad.errors import UserError

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}

# Attempts per S3 request (first try included); transient 5xx/throttling/network errors are retried
# by the AWS SDK with backoff, so a nightly job over millions of objects survives S3 hiccups.
S3_MAX_ATTEMPTS = 10
# The SDK's own connect and request timeouts (seconds): a dead endpoint fails each attempt in
# seconds, not at the OS's minutes-long TCP timeout.
S3_CONNECT_TIMEOUT_S = 5.0
S3_REQUEST_TIMEOUT_S = 60.0
# Attempts of the drivers' first request to each bucket (preflight): a wrong endpoint, missing
# credentials, a denied role or a missing bucket is one line within seconds; with S3_MAX_ATTEMPTS
# and the SDK's backoff it was a traceback after 68-93 s.
S3_PREFLIGHT_ATTEMPTS = 2

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
_FS_CACHE: dict[tuple[str, str | None, str | None, int], pafs.FileSystem] = {}
_FS_LOCK = threading.Lock()


def _scheme(uri: str) -> str:
    """'s3', 'file', or '' for a plain local path."""
    m = _SCHEME.match(uri)
    return m.group(1).lower() if m else ""


def _s3_endpoint() -> str | None:
    """Endpoint override from the standard AWS variables (service-specific one wins, as in the AWS SDKs).

    pyarrow 26 honours these in FileSystem.from_uri but not in the S3FileSystem constructor,
    which we need for the retry strategy, so they are read here.
    """
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _s3_region() -> str | None:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None


def _cached_fs(scheme: str, attempts: int = S3_MAX_ATTEMPTS) -> pafs.FileSystem:
    """One filesystem per (scheme, endpoint, region, attempts): S3FileSystem setup is not free and
    this runs per image."""
    endpoint, region = (_s3_endpoint(), _s3_region()) if scheme == "s3" else (None, None)
    key = (scheme, endpoint, region, attempts)
    with _FS_LOCK:
        fs = _FS_CACHE.get(key)
        if fs is None:
            if scheme == "s3":
                fs = pafs.S3FileSystem(
                    endpoint_override=endpoint,
                    region=region,
                    retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=attempts),
                    connect_timeout=S3_CONNECT_TIMEOUT_S,
                    request_timeout=S3_REQUEST_TIMEOUT_S,
                )
            else:
                fs = pafs.LocalFileSystem()
            _FS_CACHE[key] = fs
    return fs


def s3_error_reason(e: BaseException) -> str | None:
    """What an object-store error means to a user, in a few words with what to check; None when
    `e` is not an S3 error (pyarrow's "AWS Error ..." OSErrors, botocore's via s3fs)."""
    text = " ".join(str(e).split())
    if "AWS Error" not in text and type(e).__module__.split(".")[0] not in ("botocore", "aiobotocore", "s3fs"):
        return None
    where = _s3_endpoint() or "the AWS default endpoint"
    if any(k in text for k in ("NETWORK_CONNECTION", "Could not connect", "Could not resolve", "curlCode",
                               "Connect timeout", "EndpointConnectionError", "Connection refused")):
        return (f"cannot reach the object store at {where}; check AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL "
                "and that this machine can reach it")
    if any(k in text for k in ("NO_SUCH_BUCKET", "NoSuchBucket")):
        return "its bucket does not exist; check the bucket name (and AWS_REGION)"
    if any(k in text for k in ("INVALID_ACCESS_KEY_ID", "InvalidAccessKeyId", "SIGNATURE_DOES_NOT_MATCH",
                               "SignatureDoesNotMatch", "MISSING_AUTHENTICATION_TOKEN", "NoCredentials",
                               "Unable to locate credentials", "EXPIRED_TOKEN", "ExpiredToken")):
        return ("the object store rejected the credentials (or found none); set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or the instance/pod role")
    if any(k in text for k in ("ACCESS_DENIED", "AccessDenied", "Forbidden", "403")):
        return ("access denied; the credentials (from the environment, config files or the instance/pod role; "
                "with none found, requests go unsigned and are denied too) must be allowed to read/list it")
    return f"object store error: {text[:200]}"


def preflight(uris: dict[str, str | None]) -> None:
    """One quick request per bucket of the s3:// URIs in `uris` (flag -> URI; others are skipped),
    with few attempts and the SDK's connect timeout: UserError (one line naming the flag) for an
    unreachable endpoint, rejected or missing credentials, access denied or a missing bucket,
    within seconds. Drivers call it before anything that would retry for a minute."""
    seen = set()
    for flag, uri in uris.items():
        if not uri or _scheme(uri) != "s3":
            continue
        bucket = filesystem(uri)[1].split("/", 1)[0]
        if bucket in seen:
            continue
        seen.add(bucket)
        try:
            info = _cached_fs("s3", S3_PREFLIGHT_ATTEMPTS).get_file_info(bucket)
        except OSError as e:
            raise UserError(f"{flag} {uri}: {s3_error_reason(e) or e}") from None
        if info.type == pafs.FileType.NotFound:
            raise UserError(f"{flag} {uri}: bucket {bucket} does not exist; check the bucket name "
                            f"(and AWS_REGION, AWS_ENDPOINT_URL_S3)")


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem for `uri` and the path inside it ('bucket/key' for s3, absolute for local)."""
    scheme = _scheme(uri)
    if scheme == "s3":
        path = uri[len("s3://"):].strip("/")
        if not path:
            raise UserError(f"{uri!r} names no bucket; use s3://BUCKET/PREFIX")
        return _cached_fs("s3"), path
    if scheme == "file":
        return _cached_fs("local"), _local_path(uri)
    if scheme:
        raise UserError(f"unsupported URI scheme in {uri!r}; use a local path, file:// or s3://")
    return _cached_fs("local"), _local_path(uri)


def _local_path(uri: str) -> str:
    """Absolute local path of a plain path or file:// URI."""
    if _scheme(uri) == "file":
        uri = uri[len("file://"):]
    return os.path.abspath(os.path.expanduser(uri))


def _to_uri(like: str, path: str) -> str:
    """Turn a filesystem path back into a URI of the same scheme as `like`."""
    scheme = _scheme(like)
    if scheme == "s3":
        return "s3://" + path
    if scheme == "file":
        return "file://" + path
    return path


def join(uri: str, *parts: str) -> str:
    """Join path parts; '/'-separated for URIs (never os.path on s3 keys), os.path for local paths."""
    if not _scheme(uri):
        return os.path.join(uri, *parts)
    out = uri.rstrip("/")
    for part in parts:
        part = part.strip("/")
        if part:
            out = f"{out}/{part}"
    return out


def resolve(base: str, path: str) -> str:
    """`path` taken relative to the folder `base` unless it is absolute or a URI (manifest entries)."""
    if _scheme(path) or os.path.isabs(path):
        return path
    if _scheme(base) == "s3":
        return "s3://" + posixpath.normpath(posixpath.join(base[len("s3://"):], path))
    return _to_uri(base, os.path.normpath(os.path.join(_local_path(base), path)))


def parent(uri: str) -> str:
    """The folder or prefix that holds `uri`, in the same scheme."""
    _, path = filesystem(uri)
    return _to_uri(uri, posixpath.dirname(path))


def relative(uri: str, base: str) -> str:
    """'/'-separated path of `uri` below the folder `base` (both in the same scheme); stable ids."""
    _, path = filesystem(uri)
    _, base_path = filesystem(base)
    if not path.startswith(base_path.rstrip("/") + "/"):
        raise ValueError(f"{uri} is not below {base}")
    return path[len(base_path.rstrip("/")) + 1:]


def _info(uri: str) -> pafs.FileInfo:
    fs, path = filesystem(uri)
    return fs.get_file_info(path)


def exists(uri: str) -> bool:
    """True for an existing file, folder, bucket or non-empty s3 prefix."""
    return _info(uri).type != pafs.FileType.NotFound


def is_dir(uri: str) -> bool:
    """True for a folder, bucket or non-empty s3 prefix."""
    return _info(uri).type == pafs.FileType.Directory


def read_bytes(uri: str) -> bytes:
    """Whole object or file; FileNotFoundError naming the URI when it is missing."""
    fs, path = filesystem(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError as e:
        raise FileNotFoundError(f"no such file or object: {uri}") from e


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole file. Local writes go through a temp file and rename so readers never see half a
    file after a crash (S3 PUTs are atomic already); local parent folders are created."""
    fs, path = filesystem(uri)
    if isinstance(fs, pafs.S3FileSystem):
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    fs.create_dir(os.path.dirname(path), recursive=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    try:
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        fs.move(tmp, path)
    except BaseException:
        if fs.get_file_info(tmp).type != pafs.FileType.NotFound:
            fs.delete_file(tmp)
        raise


def makedirs(uri: str) -> None:
    """Create a local folder and its parents. No-op on S3: object stores have no folders, and marker
    objects would only show up as stray entries to other tools."""
    fs, path = filesystem(uri)
    if not isinstance(fs, pafs.S3FileSystem):
        fs.create_dir(path, recursive=True)


def list_files(uri: str, extensions: set[str] | None = None) -> list[str]:
    """All files under a folder or prefix, recursively, as sorted URIs of the same scheme as `uri`.

    `extensions` (e.g. IMAGE_EXTENSIONS) filters case-insensitively. On S3 the listing is
    ListObjectsV2 with continuation, so prefixes with more than 1000 keys are complete.
    """
    fs, path = filesystem(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    except FileNotFoundError as e:
        raise FileNotFoundError(f"no such folder or prefix: {uri}") from e
    exts = {e.lower() for e in extensions} if extensions is not None else None
    return sorted(
        _to_uri(uri, info.path)
        for info in infos
        if info.type == pafs.FileType.File
        and (exts is None or posixpath.splitext(info.path)[1].lower() in exts)
    )


VERSIONED_SCHEMA = pa.schema([("uri", pa.string()), ("size", pa.int64()), ("version", pa.string())])


def _extension_mask(paths: pa.Array, extensions: set[str] | None) -> pa.Array:
    """True where a path ends in one of `extensions` (case-insensitive); vectorized, no per-path Python."""
    if extensions is None:
        return pa.array([True] * len(paths), pa.bool_())
    alternatives = "|".join(re.escape(e.lower().lstrip(".")) for e in sorted(extensions))
    return pc.match_substring_regex(pc.utf8_lower(paths), rf"\.({alternatives})$")


def local_version(size: int, mtime_ns: int) -> str:
    """Content version of a local file: size and modification time in ns ("<size>:<mtime_ns>")."""
    return f"{size}:{mtime_ns}"


def list_versions(uri: str, extensions: set[str] | None = None) -> pa.Table:
    """(uri, size, version) of every file under a folder or prefix, recursively, sorted by uri.

    The version is what the listing gives for free, so that `score` can tell a changed input from
    a scored one without a request per object: local files, size and mtime in ns (pyarrow's
    FileInfo); S3 objects, the ETag and, in a bucket with versioning enabled, the version id
    (botocore's paged listing; pyarrow's S3 listing has no ETag).
    """
    fs, path = filesystem(uri)
    if isinstance(fs, pafs.S3FileSystem):
        from promptad.data import s3

        return s3.list_versions(uri, path, extensions)  # filtered per page, already in key order
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    except FileNotFoundError as e:
        raise FileNotFoundError(f"no such folder or prefix: {uri}") from e
    files = [i for i in infos if i.type == pafs.FileType.File]
    sizes = pa.array([i.size for i in files], pa.int64())
    mtimes = pa.array([i.mtime_ns for i in files], pa.int64())
    version = pc.binary_join_element_wise(pc.cast(sizes, pa.string()), pc.cast(mtimes, pa.string()), ":")
    paths = pa.array([_to_uri(uri, i.path) for i in files], pa.string())
    table = pa.table([paths, sizes, version], schema=VERSIONED_SCHEMA)
    table = table.filter(_extension_mask(table["uri"], extensions))
    return table.take(pc.sort_indices(table["uri"]))


def file_version(uri: str) -> tuple[int, str]:
    """(size, version) of one file or object, as list_versions gives it; FileNotFoundError if missing."""
    fs, path = filesystem(uri)
    if isinstance(fs, pafs.S3FileSystem):
        from promptad.data import s3

        return s3.file_version(uri, path)
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(f"no such file: {uri}")
    return int(info.size), local_version(info.size, info.mtime_ns)


def list_dirs(uri: str) -> list[str]:
    """Names of the immediate sub-folders (or sub-prefixes) of a folder, sorted."""
    fs, path = filesystem(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    except FileNotFoundError as e:
        raise FileNotFoundError(f"no such folder or prefix: {uri}") from e
    return sorted(info.base_name for info in infos if info.type == pafs.FileType.Directory)


def _default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "promptad" / "s3"


def local_copy(uri: str, cache_dir: str | None = None) -> str:
    """A local path for `uri`: local paths pass through; s3 objects are downloaded once into
    `cache_dir` (for libraries that only open local files, e.g. weight files).

    The cache key includes the object's size and mtime, so an overwritten object is fetched again;
    the download goes to a temp file and is renamed, so concurrent workers never see a partial file,
    and it holds a lock file beside it, so workers of one node that start together download it once
    (the others wait for it) rather than each its own copy of a gigabyte.
    """
    fs, path = filesystem(uri)
    if not isinstance(fs, pafs.S3FileSystem):
        if fs.get_file_info(path).type != pafs.FileType.File:
            raise FileNotFoundError(f"no such file: {uri}")
        return path
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(f"no such object: {uri}")
    key = hashlib.sha256(f"{uri}\0{info.size}\0{info.mtime_ns}".encode()).hexdigest()[:32]
    dest = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
    dest = dest / key / info.base_name
    if dest.is_file() and dest.stat().st_size == info.size:
        return str(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / ".lock", "wb") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if dest.is_file() and dest.stat().st_size == info.size:
            return str(dest)  # another worker downloaded it while this one waited
        tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex}")
        try:
            with fs.open_input_stream(path) as src, open(tmp, "wb") as out:
                while chunk := src.read(1 << 22):
                    out.write(chunk)
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
    return str(dest)


def sha256_file(path: str) -> str:
    """Hex sha256 of a local file, streamed (weight files can be gigabytes)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
