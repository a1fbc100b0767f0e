"""Token shards in object storage (`s3://bucket/prefix`, `gs://bucket/prefix`).

litdata streams the chunks themselves (`StreamingDataset` with a bounded local cache). This module does what has to
happen around it: check a location before any work starts and turn what goes wrong into one line, fetch the small
files a run needs on local disk (the index, the tokenizer), and upload a prepared folder.

Credentials and the endpoint come from the standard environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
`AWS_PROFILE`, `AWS_ENDPOINT_URL`, `GOOGLE_APPLICATION_CREDENTIALS`) or from `storage_options`, the keyword arguments
of `boto3.client("s3", ...)` that litdata also takes (e.g. `{"endpoint_url": "http://minio:9000"}`).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

REMOTE_SCHEMES = ("s3://", "gs://")


class RemoteDataError(OSError):
    """A remote location that cannot be used, with what to do about it."""


def is_remote(path: str | Path) -> bool:
    return str(path).startswith(REMOTE_SCHEMES)


def join(root: str | Path, *parts: str) -> str | Path:
    """`root/part/...` for a local folder (a `Path`) or a URL (a string; `Path` would fold `s3://` into `s3:/`)."""
    if is_remote(root):
        return "/".join([str(root).rstrip("/"), *parts])
    return Path(root).joinpath(*parts)


def _split(url: str) -> tuple[str, str, str]:
    scheme, rest = url.split("://", 1)
    bucket, _, key = rest.partition("/")
    return scheme, bucket, key.strip("/")


def _endpoint(storage_options: dict | None) -> str | None:
    return (
        (storage_options or {}).get("endpoint_url")
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
    )


def allow_plain_http(storage_options: dict | None = None) -> None:
    """Let litdata's obstore downloads reach an `http://` endpoint (MinIO, moto), which obstore refuses by default."""
    endpoint = _endpoint(storage_options)
    if endpoint and endpoint.startswith("http://"):
        from litdata.streaming import downloader

        options = getattr(downloader, "_OBSTORE_CLIENT_OPTIONS", None)
        if isinstance(options, dict):
            options["allow_http"] = True


def s3_client(storage_options: dict | None = None):
    """A boto3 S3 client that fails fast (two attempts, short timeouts) for checks and small transfers."""
    import boto3
    import botocore.config

    config = botocore.config.Config(retries={"max_attempts": 2}, connect_timeout=5, read_timeout=60)
    # a fresh session: the default one caches the credentials it resolved first
    return boto3.session.Session().client("s3", config=config, **(storage_options or {}))


def _explain_s3(error: Exception, url: str, storage_options: dict | None) -> RemoteDataError:
    """One line for what boto3 raised while reading or writing `url`."""
    import botocore.exceptions as bx

    _, bucket, key = _split(url)
    where = _endpoint(storage_options) or "AWS S3"
    if isinstance(error, bx.NoCredentialsError):
        return RemoteDataError(
            f"no S3 credentials for {url}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), "
            "or pass them in storage_options"
        )
    if isinstance(error, bx.EndpointConnectionError | bx.ConnectTimeoutError):
        return RemoteDataError(f"cannot reach the S3 endpoint {where} for {url}: check AWS_ENDPOINT_URL and network")
    code = error.response.get("Error", {}).get("Code", "") if isinstance(error, bx.ClientError) else ""
    missing_bucket = RemoteDataError(f"the bucket {bucket!r} of {url} does not exist at {where}: create it or fix it")
    if code == "NoSuchBucket":
        return missing_bucket
    if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "ExpiredToken"):
        return RemoteDataError(
            f"{where} refused the credentials for {url} ({code}): check AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY "
            "and the bucket policy"
        )
    if code in ("NoSuchKey", "404"):
        try:  # a GET or HEAD of a key answers 404 for a missing bucket too
            s3_client(storage_options).head_bucket(Bucket=bucket)
        except bx.ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchBucket"):
                return missing_bucket
        return RemoteDataError(f"{url} not found")
    return RemoteDataError(f"S3 error on {url}: {error}")


def download(url: str, local_path: Path, storage_options: dict | None = None) -> Path:
    """Copy one remote file to `local_path` (written under a temporary name, then renamed)."""
    local_path = Path(local_path)
    local_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = local_path.with_name(f".{local_path.name}.{os.getpid()}.part")  # ranks of one node may fetch at once
    scheme, bucket, key = _split(url)
    if scheme == "s3":
        import botocore.exceptions as bx

        try:
            s3_client(storage_options).download_file(bucket, key, str(tmp))
        except (bx.BotoCoreError, bx.ClientError) as e:
            raise _explain_s3(e, url, storage_options) from None
    else:
        from litdata.streaming.downloader import get_downloader

        try:
            get_downloader(url.rsplit("/", 1)[0], str(local_path.parent), [], storage_options).download_file(
                url, str(tmp)
            )
        except Exception as e:  # google-cloud-storage raises its own types; keep the message, add the URL
            raise RemoteDataError(f"cannot read {url}: {e}") from None
    os.replace(tmp, local_path)
    return local_path


def fetch_files(url: str, local_dir: Path, names: tuple[str, ...], storage_options: dict | None = None) -> list[str]:
    """Download those of `names` that exist under the prefix `url` into `local_dir`; return which were found."""
    found = []
    for name in names:
        try:
            download(f"{url.rstrip('/')}/{name}", Path(local_dir) / name, storage_options)
            found.append(name)
        except RemoteDataError as e:
            if "not found" not in str(e):
                raise
    return found


def read_json(url: str, storage_options: dict | None = None) -> dict:
    """A small remote JSON file (an `index.json`), read through a temporary download."""
    import json

    with tempfile.TemporaryDirectory() as tmp:
        return json.loads(download(url, Path(tmp) / "file.json", storage_options).read_text())


def check_writable(url: str, storage_options: dict | None = None) -> None:
    """Fail before any work when the bucket of `url` is missing or the credentials are refused (one line)."""
    scheme, bucket, _ = _split(url)
    if scheme != "s3":
        raise RemoteDataError(f"writing to {scheme}:// is not supported: write to s3:// or a local folder")
    import botocore.exceptions as bx

    try:
        s3_client(storage_options).head_bucket(Bucket=bucket)
    except (bx.BotoCoreError, bx.ClientError) as e:
        code = e.response.get("Error", {}).get("Code", "") if isinstance(e, bx.ClientError) else ""
        if code in ("404", "NoSuchBucket"):
            e = bx.ClientError({"Error": {"Code": "NoSuchBucket"}}, "HeadBucket")
        raise _explain_s3(e, url, storage_options) from None


def upload_file(local_path: Path, url: str, storage_options: dict | None = None) -> None:
    """Upload one file to `url` (`s3://bucket/key`)."""
    scheme, bucket, key = _split(url)
    if scheme != "s3":
        raise RemoteDataError(f"uploading to {scheme}:// is not supported: write to s3:// or a local folder")
    import botocore.exceptions as bx

    try:
        s3_client(storage_options).upload_file(str(local_path), bucket, key)
    except (bx.BotoCoreError, bx.ClientError) as e:
        raise _explain_s3(e, url, storage_options) from None


def upload_dir(local_dir: Path, url: str, storage_options: dict | None = None) -> int:
    """Upload every file under `local_dir` to the prefix `url`; each `index.json` goes last so that readers never see
    an index whose chunks are still missing. Returns the number of files uploaded."""
    scheme, bucket, key = _split(url)
    if scheme != "s3":
        raise RemoteDataError(f"uploading to {scheme}:// is not supported: write to s3:// or a local folder")
    import botocore.exceptions as bx

    files = sorted(p for p in Path(local_dir).rglob("*") if p.is_file())
    files.sort(key=lambda p: p.name == "index.json")
    client = s3_client(storage_options)
    try:
        for path in files:
            client.upload_file(str(path), bucket, "/".join(filter(None, [key, path.relative_to(local_dir).as_posix()])))
    except (bx.BotoCoreError, bx.ClientError) as e:
        raise _explain_s3(e, url, storage_options) from None
    return len(files)
