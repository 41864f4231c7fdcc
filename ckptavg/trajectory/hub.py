"""A trajectory on the Hugging Face Hub: the step branches of one model repo, through huggingface_hub.

Every revision is downloaded by its commit id into the standard Hub cache (content-addressed:
a file shared by two branches is stored once), so a killed run's finished downloads are found
again without a request. Only revisions this tool downloaded are ever deleted from the cache, and
none that another live run holds (`holds.RevisionLedger`, kept in the cache itself).

huggingface_hub reads HF_ENDPOINT and HF_HUB_OFFLINE when it is imported, so it is imported
here lazily, after the command line has been parsed.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
import os
import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..atomic import write_text
from ..checkpoints.layouts import DEFAULT_STEP_PATTERN
from ..checkpoints.names import pick_files
from ..errors import (
    HubAuthError,
    HubError,
    HubOfflineError,
    HubUnreachableError,
    InputError,
    IntegrityError,
    RepoNotFoundError,
    RevisionNotFoundError,
)
from ..hashing import cache_root, hub_blob_sha256, verify_blob
from ..manifest import Provenance
from .holds import RevisionLedger
from .sources import Duplicate, find_duplicates, step_branches

LIST_WORKERS = 8
ByteBar = Callable[[str, int], Callable[[int], None]]


@dataclass(frozen=True)
class RemoteFile:
    path: str
    size: int
    sha256: str | None  # LFS files only


def _transport_errors() -> tuple[type[BaseException], ...]:
    """The HTTP client's connection-level errors (no network, refused, timeout): huggingface_hub 2.x
    speaks through httpx2, 1.x through httpx."""
    found = []
    for module in ("httpx2", "httpx"):
        try:
            found.append(importlib.import_module(module).TransportError)
        except ImportError:
            pass
    return tuple(found)


@contextmanager
def hub_errors(repo_id: str) -> Iterator[None]:
    """huggingface_hub's typed exceptions as ckptavg's (errors.HubError's subclasses, the same
    distinctions), each a one-line message that says what to do."""
    from huggingface_hub import constants, errors

    offline_hint = (f"with no network, pre-download the revisions (`hf download {repo_id} --revision stepN`) and "
                    f"set HF_HUB_OFFLINE=1")
    try:
        yield
    except errors.GatedRepoError:
        raise HubAuthError(f"{repo_id} is gated: accept its terms on the Hub and log in (`hf auth login`)") from None
    except errors.RepositoryNotFoundError:
        raise RepoNotFoundError(f"{repo_id}: no such model repo on {constants.ENDPOINT} (or it is private: "
                                f"log in with `hf auth login`)") from None
    except errors.RevisionNotFoundError as e:
        raise RevisionNotFoundError(f"{repo_id}: revision not found ({_first_line(e)})") from None
    except errors.OfflineModeIsEnabled:
        raise HubOfflineError(f"{repo_id}: HF_HUB_OFFLINE is set and this needs the Hub") from None
    except errors.LocalEntryNotFoundError as e:
        raise HubUnreachableError(f"{repo_id}: cannot download ({_first_line(e)}); {offline_hint}") from None
    except errors.HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status in (401, 403):
            raise HubAuthError(f"{repo_id}: the Hub refused access ({status}): log in with `hf auth login` "
                               f"with a token that can read it") from None
        kind = HubUnreachableError if status is not None and status >= 500 else HubError
        raise kind(f"{repo_id}: the Hub answered {_first_line(e)}") from None
    except _transport_errors() as e:
        raise HubUnreachableError(f"cannot reach {constants.ENDPOINT} for {repo_id} ({e}); {offline_hint}") from None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


class HubTrajectory:
    """Steps are the branches whose names fully match `pattern` (group 1 is the step)."""

    def __init__(self, repo_id: str, pattern: str = DEFAULT_STEP_PATTERN, *, cache_dir: Path | None = None,
                 bars: ByteBar | None = None) -> None:
        from huggingface_hub import HfApi, constants

        self.repo_id = repo_id
        self.pattern = pattern
        self.name = repo_id.rsplit("/", 1)[-1]
        self.cache_dir = Path(cache_dir or constants.HF_HUB_CACHE)
        self.offline = bool(constants.HF_HUB_OFFLINE)
        self.bars = bars
        self._api = HfApi()
        self._trees: dict[str, list[RemoteFile]] = {}
        self._ledger = RevisionLedger(self.cache_dir / ".locks" / "ckptavg" / self._repo_cache.name)
        self._adopt_old_ledger()
        self.commits: dict[str, str] = {}  # branch -> commit id
        self.branches: dict[int, str] = {}  # step -> branch
        self.refresh()
        if not self.branches:
            where = "in the cache (HF_HUB_OFFLINE is set)" if self.offline else "on the Hub"
            raise InputError(f"{repo_id}: no branches matching {pattern!r} {where}")

    # -- listing --------------------------------------------------------------------------------
    def _remote_refs(self) -> dict[str, str]:
        with hub_errors(self.repo_id):
            refs = self._api.list_repo_refs(self.repo_id)
        return {b.name: b.target_commit for b in refs.branches}

    @property
    def _repo_cache(self) -> Path:
        return self.cache_dir / ("models--" + self.repo_id.replace("/", "--"))

    def _cached_repo(self):
        """This repo in huggingface_hub's own view of the cache (`scan_cache_dir`), or None."""
        from huggingface_hub import scan_cache_dir
        from huggingface_hub.errors import CacheNotFound

        try:
            scan = scan_cache_dir(self.cache_dir)
        except CacheNotFound:
            return None
        return next((r for r in scan.repos if r.repo_id == self.repo_id and r.repo_type == "model"), None)

    @functools.cached_property
    def _offline_snapshot(self):
        """The cache as it was when an offline run started: what its listings are read from (once, not once
        per branch)."""
        return self._cached_repo()

    def _cached_refs(self) -> dict[str, str]:
        repo = self._offline_snapshot
        if repo is None or not repo.refs:
            raise HubOfflineError(f"HF_HUB_OFFLINE is set and {self.repo_id} is not in the cache {self.cache_dir}: "
                                  f"download its revisions first (`hf download {self.repo_id} --revision stepN`)")
        return {ref: revision.commit_hash for ref, revision in repo.refs.items()}

    def tree(self, branch: str) -> list[RemoteFile]:
        if branch not in self._trees:
            self._trees[branch] = self._cached_tree(branch) if self.offline else self._remote_tree(branch)
        return self._trees[branch]

    def _remote_tree(self, branch: str) -> list[RemoteFile]:
        from huggingface_hub.hf_api import RepoFile

        with hub_errors(self.repo_id):
            items = list(self._api.list_repo_tree(self.repo_id, revision=self.commits[branch], recursive=True))
        return [RemoteFile(i.path, i.size, i.lfs.sha256 if i.lfs else None) for i in items if isinstance(i, RepoFile)]

    def _cached_tree(self, branch: str) -> list[RemoteFile]:
        repo = self._offline_snapshot
        revision = next((r for r in repo.revisions if r.commit_hash == self.commits[branch]), None) if repo else None
        if revision is None:
            return []
        return sorted((RemoteFile(f.file_path.relative_to(revision.snapshot_path).as_posix(), f.size_on_disk,
                                  hub_blob_sha256(f.file_path)) for f in revision.files), key=lambda f: f.path)

    def _list_all(self) -> None:
        todo = [b for b in self.commits if b not in self._trees]
        with ThreadPoolExecutor(LIST_WORKERS) as pool:
            for branch, files in zip(todo, pool.map(self.tree, todo), strict=True):
                self._trees[branch] = files

    def files(self, step: int) -> list[RemoteFile]:
        """What to download for one step: its weights (safetensors when present) and its side files."""
        branch = self.branches[step]
        listed = self.tree(branch)
        chosen = pick_files([f.path for f in listed])
        if chosen is None:
            if self.offline:
                raise InputError(f"HF_HUB_OFFLINE is set and {self.repo_id}@{branch} has no weights in the cache: "
                                 f"download it first (`hf download {self.repo_id} --revision {branch}`)")
            raise InputError(f"{self.repo_id}@{branch}: no weights (model.safetensors or pytorch_model.bin, "
                             f"single or sharded)")
        return [f for f in listed if f.path in chosen]

    # -- the Source interface -----------------------------------------------------------------------
    local = False  # downloaded, then deleted after its last window
    @property
    def missing_hint(self) -> str:
        if self.offline:
            return (f"; HF_HUB_OFFLINE is set, so only revisions in the cache count: download the others first "
                    f"(`hf download {self.repo_id} --revision stepN`)")
        return ""

    def refresh(self) -> None:
        """List the repo's branches again (a run that pushes each checkpoint as a branch while it trains);
        a branch that now points elsewhere is listed again when asked for."""
        commits = self._cached_refs() if self.offline else self._remote_refs()
        for branch in [b for b in self._trees if commits.get(b) != self.commits.get(b)]:
            del self._trees[branch]
        self.commits, self.branches = commits, step_branches(commits, self.pattern, self.repo_id)

    def steps(self) -> list[int]:
        return sorted(self.branches)

    def size(self, step: int) -> int:
        return sum(f.size for f in self.files(step))

    def label(self, step: int) -> str:
        return self.branches[step]

    def describe(self, step: int) -> Provenance:
        branch = self.branches[step]
        return Provenance(f"hf://{self.repo_id}", step, self.repo_id, branch, self.commits[branch], self.pattern,
                          str(self.cache_dir.absolute()))

    def duplicates(self, steps: list[int], read_data: bool = True) -> list[Duplicate]:
        """Revisions among `steps` whose weights are byte-identical to another branch's (any branch of the
        repo), from the listings' LFS sha256: no tensor byte is read, so a dry run checks this too."""
        self._list_all()
        blobs = {}
        for branch, listed in self._trees.items():
            chosen = pick_files([f.path for f in listed]) or set()
            blobs[branch] = {f.path: f.sha256 for f in listed if f.path in chosen and f.sha256}
        return find_duplicates(blobs, {b: s for s, b in self.branches.items()}, {self.branches[s] for s in steps})

    def fetch(self, step: int) -> Path:
        from huggingface_hub import hf_hub_download, try_to_load_from_cache

        branch, files = self.branches[step], self.files(step)
        commit = self.commits[branch]
        self._ledger.hold(commit)  # before looking: another run may be deleting it
        missing = [f for f in files if not isinstance(
            try_to_load_from_cache(self.repo_id, f.path, cache_dir=self.cache_dir, revision=commit), str)]
        if missing and self.offline:
            raise InputError(f"HF_HUB_OFFLINE is set and {self.repo_id}@{branch} is incomplete in the cache "
                             f"(missing {', '.join(f.path for f in missing)}): download it first "
                             f"(`hf download {self.repo_id} --revision {branch}`)")
        if missing:
            self._ledger.mark_downloaded(commit)
        advance = self.bars(f"download {branch}", sum(f.size for f in missing)) if self.bars and missing else None
        tqdm_class = _tqdm_forwarding(advance) if advance else None

        def download(f: RemoteFile) -> Path:
            for _ in range(2):
                with hub_errors(self.repo_id):
                    path = Path(hf_hub_download(self.repo_id, f.path, revision=commit, cache_dir=self.cache_dir,
                                                tqdm_class=tqdm_class))
                if path.exists():
                    break
                # linked to a blob that another run deleted with a revision it shared, between
                # huggingface_hub's look and its link: downloaded once more (the link is now ours)
            return path

        # each weight file is hashed while the next one downloads, from the page cache it was just written to
        with ThreadPoolExecutor(1, thread_name_prefix="ckptavg-verify") as hasher:
            checks = []
            for f in files:
                path = download(f)
                snapshot = path.parents[len(Path(f.path).parts) - 1]  # the revision's folder in the cache
                if f.sha256:
                    checks.append((f, path, hasher.submit(verify_blob, path, f.sha256)))
            for f, path, check in checks:
                if check.result() != f.sha256:
                    _discard(path)  # once more: a byte flipped in transit does not flip twice
                    path = download(f)
                    actual = verify_blob(path, f.sha256)
                    if actual != f.sha256:
                        _discard(path)
                        raise IntegrityError(f"{self.repo_id}@{branch}: {f.path} arrived corrupt twice (sha256 "
                                             f"{actual}, the Hub lists {f.sha256}); the download was deleted")
        self._write_ref(branch, commit)
        return snapshot

    def _write_ref(self, branch: str, commit: str) -> None:
        """What huggingface_hub records when it downloads by branch name, so that HF_HUB_OFFLINE runs find the
        revision. ckptavg downloads by commit id (the listing's, so a branch that moves mid-run cannot mix two
        commits), and huggingface_hub has no public call that records a ref, so it is written here, as
        huggingface_hub's cache layout documents it: refs/BRANCH holds the commit id."""
        ref = self._repo_cache / "refs" / branch
        if not self.offline and (not ref.is_file() or ref.read_text() != commit):
            ref.parent.mkdir(parents=True, exist_ok=True)
            write_text(ref, commit)

    def evict(self, step: int) -> None:
        """Let go of a revision, deleting it if ckptavg downloaded it and no other run holds it."""
        commit = self.commits[self.branches[step]]
        self._ledger.let_go(commit, lambda: self._delete(commit))

    def evict_leftovers(self, keep: set[int]) -> list[str]:
        """Delete revisions a killed run downloaded that no remaining window needs and no live run holds."""
        keep_commits = {self.commits[self.branches[s]] for s in keep} | self._ledger.held()
        return [c for c in sorted(self._ledger.downloaded() - keep_commits)
                if self._ledger.let_go(c, lambda c=c: self._delete(c))]

    def release(self) -> None:
        """Let go of every revision this run holds, deleting none (the run keeps its downloads, or ended)."""
        self._ledger.release()

    def disk_usage(self) -> int:
        """Bytes of this repo's blobs. Asked after every action of a run, so it lists one folder rather than
        scanning the whole cache (`scan_cache_dir` reads every repo in it)."""
        blobs = self._repo_cache / "blobs"
        return sum(e.stat().st_size for e in os.scandir(blobs) if e.is_file()) if blobs.is_dir() else 0

    def _delete(self, commit: str) -> None:
        """Blobs other snapshots still use are kept by huggingface_hub."""
        from huggingface_hub import scan_cache_dir

        scan_cache_dir(self.cache_dir).delete_revisions(commit).execute()

    def _adopt_old_ledger(self) -> None:
        """Downloads recorded by an earlier ckptavg (one JSON list per cache and repo in ckptavg's own
        cache folder), moved into the ledger, so that they are still deleted after their last window."""
        where = hashlib.sha1(str(self.cache_dir.resolve()).encode()).hexdigest()[:12]
        old = cache_root() / "downloads" / f"{where}-{self._repo_cache.name}.json"
        try:
            commits = json.loads(old.read_text())
        except (OSError, ValueError):
            return
        for commit in commits if isinstance(commits, list) else ():
            if isinstance(commit, str) and re.fullmatch(r"[0-9a-f]{40}", commit):
                self._ledger.mark_downloaded(commit)
        old.unlink(missing_ok=True)


def _discard(snapshot_file: Path) -> None:
    """Delete a cached file and the blob it links to, so that the next request downloads it again."""
    blob = snapshot_file.resolve()
    snapshot_file.unlink(missing_ok=True)
    blob.unlink(missing_ok=True)


def _tqdm_forwarding(advance: Callable[[int], None]):
    """A silent tqdm class whose updates feed our own (rich) progress bar."""
    from tqdm.auto import tqdm

    class Forward(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

        def update(self, n=1):
            if n:
                advance(int(n))

    return Forward


def looks_like_repo_id(text: str) -> bool:
    return re.fullmatch(r"[\w.-]+/[\w.-]+", text) is not None
