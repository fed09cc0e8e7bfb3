"""A local stand-in for the Hugging Face Hub: uploads land in a folder, downloads read from it, nothing goes out.

`LocalHub.install(monkeypatch)` replaces the Hub client's upload calls (`HfApi.create_repo`, `create_branch`,
`create_commit`, `upload_folder`, `upload_file`, which transformers' and our `push_to_hub` make) with ones that write
each commit into `root` laid out as the Hub client's own cache (`models--OWNER--NAME/refs/REVISION` naming a
commit, `snapshots/COMMIT/...` its files), and switches the client to offline mode with `root` as its cache. So the
client's own download code (`hf_hub_download`, used by peft's `from_pretrained`, and `snapshot_download`) reads the
pushed files back unchanged, and any request that would reach the network raises instead. The environment variables
are set too, so a subprocess sees the same Hub.
"""

from __future__ import annotations

import hashlib
import io
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import huggingface_hub
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
from huggingface_hub.hf_api import RepoUrl


class LocalHub:
    """A Hub whose repositories are folders under `root` (see the module's doc)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.commits: list[tuple[str, str, list[str]]] = []  # (repo_id, revision, paths written) per commit

    def repo_folder(self, repo_id: str) -> Path:
        return self.root / f"models--{repo_id.replace('/', '--')}"

    def files(self, repo_id: str, revision: str = "main") -> dict[str, Path]:
        """The files of `repo_id` at `revision`, by their path in the repository."""
        snapshot = self._snapshot(repo_id, revision)
        if snapshot is None:
            return {}
        return {p.relative_to(snapshot).as_posix(): p for p in sorted(snapshot.rglob("*")) if p.is_file()}

    def _snapshot(self, repo_id: str, revision: str) -> Path | None:
        ref = self.repo_folder(repo_id) / "refs" / revision
        return self.repo_folder(repo_id) / "snapshots" / ref.read_text() if ref.is_file() else None

    def _commit(self, repo_id: str, revision: str | None, writes: dict[str, bytes], deletes: list[str]) -> str:
        """A new commit on `revision`: the previous files, `deletes` removed, `writes` added or replaced."""
        revision = revision or "main"
        if not self.repo_folder(repo_id).is_dir():
            raise FileNotFoundError(f"stand-in Hub: no repository {repo_id!r} (create_repo first)")
        oid = hashlib.sha1(f"{repo_id}@{revision}#{len(self.commits)}".encode()).hexdigest()
        new = self.repo_folder(repo_id) / "snapshots" / oid
        previous = self._snapshot(repo_id, revision)
        if previous is not None:
            shutil.copytree(previous, new)
        new.mkdir(parents=True, exist_ok=True)
        for path in deletes:
            (new / path).unlink(missing_ok=True)
        for path, content in writes.items():
            (new / path).parent.mkdir(parents=True, exist_ok=True)
            (new / path).write_bytes(content)
        (self.repo_folder(repo_id) / "refs").mkdir(exist_ok=True)
        (self.repo_folder(repo_id) / "refs" / revision).write_text(oid)
        self.commits.append((repo_id, revision, sorted(writes)))
        return oid

    def install(self, monkeypatch: Any) -> LocalHub:
        """Route the Hub client's uploads here and its downloads to here, offline; undone with `monkeypatch`."""
        hub = self

        def create_repo(self, repo_id: str, *args: Any, exist_ok: bool = False, **kwargs: Any) -> RepoUrl:
            folder = hub.repo_folder(repo_id)
            if folder.exists() and not exist_ok:
                raise FileExistsError(f"stand-in Hub: {repo_id!r} already exists")
            folder.mkdir(parents=True, exist_ok=True)
            return RepoUrl(f"https://huggingface.co/{repo_id}")

        def create_branch(self, repo_id: str, *, branch: str, exist_ok: bool = False, **kwargs: Any) -> None:
            refs = hub.repo_folder(repo_id) / "refs"
            if not (refs / branch).exists():
                refs.mkdir(parents=True, exist_ok=True)
                main = refs / "main"
                if main.is_file():
                    (refs / branch).write_text(main.read_text())

        def create_commit(self, repo_id: str, operations: list, *args: Any, revision: str | None = None,
                          **kwargs: Any) -> SimpleNamespace:
            writes, deletes = {}, []
            for op in operations:
                if isinstance(op, CommitOperationAdd):
                    writes[op.path_in_repo] = _read(op.path_or_fileobj)
                elif isinstance(op, CommitOperationDelete):
                    deletes.append(op.path_in_repo)
                else:
                    raise NotImplementedError(f"the stand-in Hub does not take {type(op).__name__}")
            return SimpleNamespace(oid=hub._commit(repo_id, revision, writes, deletes), repo_id=repo_id)

        def upload_folder(self, *, repo_id: str, folder_path: str | Path, path_in_repo: str | None = None,
                          revision: str | None = None, **kwargs: Any) -> SimpleNamespace:
            folder = Path(folder_path)
            prefix = f"{path_in_repo.strip('/')}/" if path_in_repo else ""
            writes = {prefix + p.relative_to(folder).as_posix(): p.read_bytes()
                      for p in sorted(folder.rglob("*")) if p.is_file()}
            return SimpleNamespace(oid=hub._commit(repo_id, revision, writes, []), repo_id=repo_id)

        def upload_file(self, *, path_or_fileobj: Any, path_in_repo: str, repo_id: str,
                        revision: str | None = None, **kwargs: Any) -> SimpleNamespace:
            oid = hub._commit(repo_id, revision, {path_in_repo: _read(path_or_fileobj)}, [])
            return SimpleNamespace(oid=oid, repo_id=repo_id)

        for name, function in (("create_repo", create_repo), ("create_branch", create_branch),
                               ("create_commit", create_commit), ("upload_folder", upload_folder),
                               ("upload_file", upload_file)):
            monkeypatch.setattr(HfApi, name, function)
        self.root.mkdir(parents=True, exist_ok=True)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(self.root))
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setenv("HF_HUB_CACHE", str(self.root))
        return self


def _read(source: Any) -> bytes:
    """The bytes of a path, of bytes, or of a binary file object."""
    if isinstance(source, (bytes, bytearray)):
        return bytes(source)
    if isinstance(source, (str, Path)):
        return Path(source).read_bytes()
    if isinstance(source, io.IOBase) or hasattr(source, "read"):
        return source.read()
    raise TypeError(f"cannot read {type(source).__name__}")
