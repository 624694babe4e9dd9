"""
Download the Complete Tang Poems (全唐诗) corpus, verified byte for byte.

The corpus is 58 JSON files, poet.tang.{0,1000,...,57000}.json, from the open
chinese-poetry/chinese-poetry project (MIT licence). We fetch them from a
pinned commit rather than from `master`, so the bytes never change and every
file's sha256 can be written into this module: a download is only accepted
(renamed from NAME.part to NAME) once its hash matches.

data/corpus.py's load_corpus calls download_corpus when poems/ is empty; the command
`python -m poems.download` (poems/download.py) calls it by hand.

With no network, skip all of this and point the training scripts at a local
copy of the corpus instead, e.g. --poems ../shared/corpus/quan-tang-shi
"""

from __future__ import annotations

import hashlib
import http.client
import os
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.parse import quote, urlsplit
from urllib.request import Request, urlopen

from tqdm import tqdm

from data.errors import UserError

# -----------------------------------------------------------------------------
# what to download

UPSTREAM_COMMIT = "99ebbef7e1345c0985c44b9fd96a3f9e776f117b"
# the upstream folder is named 全唐诗; a real HTTP request needs it percent-encoded (UTF-8)
BASE_URL = (
    "https://raw.githubusercontent.com/chinese-poetry/chinese-poetry/"
    f"{UPSTREAM_COMMIT}/{quote('全唐诗')}/"
)
# numeric order (0, 1000, ..., 57000), which is also the order of the poems
FILE_NAMES = [f"poet.tang.{n}.json" for n in range(0, 58000, 1000)]

# sha256 of every file at UPSTREAM_COMMIT, computed once from a verified copy
SHA256: dict[str, str] = {
    "poet.tang.0.json": "4f88f429938082523cdc72a1612bd7a7c3e3f7a33f8192c61ae51340efc3c92d",
    "poet.tang.1000.json": "6e703b8d8dcedbd6110f6d48d043665ca2131db2035a5bfcef5e59a19aeb6d75",
    "poet.tang.2000.json": "ec28efa7e2ae9cdbbba09f0ed186e32ccae47a325ad1e5816b7ad56071c1665a",
    "poet.tang.3000.json": "9e4ba2323752b6b9fbdba875cdbc6a26636fe0cabc85fd066370d4915952001f",
    "poet.tang.4000.json": "b8a7946c879b9658a6c667a4c55f776fae7e5e00a17789ab06b274c1429afc66",
    "poet.tang.5000.json": "a0306e6962cff01639ad9a00b042a201b8dec1f30fa5d768a7b112589887861e",
    "poet.tang.6000.json": "982a21d2b15922b406911f1c825785054314c686da86b2155d7aebb362d22771",
    "poet.tang.7000.json": "a6fb69d7b4343c904dc56ae5aae34facc2478d196b51c37ceba9d1e2f171b342",
    "poet.tang.8000.json": "ac3848e95b02736168003863795de4474838c2d6a71a24ca2a4a280ea5177773",
    "poet.tang.9000.json": "b99d6596e3a1fe1a661652383083f92d196b8baf4e461d087081d5e1e1b7a51f",
    "poet.tang.10000.json": "b97d1c5509ab62f5b433dee2020c11c4deda4542e276683d1ada6619c34c2113",
    "poet.tang.11000.json": "9adf1835246053c821d99af39ce9092e14a94e1baf91740098bd9fc6f6f1cd27",
    "poet.tang.12000.json": "ec43d055a219d52ecdb58cd30a8a444189392f0d68b92a41495df1c72c5fd095",
    "poet.tang.13000.json": "eb9c85072d7913bb972e07c72f0123e9d7addca22cfd833cb79a5d74b1c76ebf",
    "poet.tang.14000.json": "1e366dd3fb5a011091524bed36e4edff5d015bf0ddb14143f298515387dbd9a9",
    "poet.tang.15000.json": "0386e58f46517daa3af0e0f385e0223f1efc0dac53afbe8fea64f99074d870b7",
    "poet.tang.16000.json": "1c477aef1fc50523f9baf10f29d2d89201a14c4c73001c1c041d0fe8464d11db",
    "poet.tang.17000.json": "11bac8333b2042975b9844423d113ff2c6fdf701c8b08a5b3aaa6bc9472222de",
    "poet.tang.18000.json": "37543a147d16e3576d5f45ba8f7b8b51fc311bc10eddae9440f16f2d5ae885c2",
    "poet.tang.19000.json": "dea74b41bc807ce2527bb119862a251e3a92b6f69bdf9f98b1434a8336830542",
    "poet.tang.20000.json": "8ccf0783888b15bec60d0253e278cd4b67e94a77725df8ed079d4d8062d050b4",
    "poet.tang.21000.json": "bddae814c82bf6a9fd294504aa48794bca5f03e986110739b1577aa811125cbd",
    "poet.tang.22000.json": "d7e7efe3f67415455ae93974a5aa67427e99f6713fde27920bfb657ad3204c4a",
    "poet.tang.23000.json": "220a535a762349ec1beed00f1dc11293ccefc70bda15c5258bbcab208b14337f",
    "poet.tang.24000.json": "2f40a4ec0e4469c29f0f028d7a4ad73b83850aa271be9b63ea0c08de6e094dee",
    "poet.tang.25000.json": "7e7c00ba3f7a95e97de5440f85affa9d54b420d31995b449e97a3e9ea00259f5",
    "poet.tang.26000.json": "74b5bed25622da1611928fdb31297fafadaf2876ce32ddb0c8b6d12d772979f4",
    "poet.tang.27000.json": "11626fcc310bbbcc601f7c8c4d8a664cef4907076cd7ec4f16268ee5b921ba44",
    "poet.tang.28000.json": "86a15affa95859046f869ffd4850886250d1a181e5151b1f096f728fb2d67502",
    "poet.tang.29000.json": "e1a0cffe17b4f109399db38f2b23f9b6668b8ca1c3c24e36d5cbe4f40a925862",
    "poet.tang.30000.json": "e71996f771d15476bae48751081b473b381774b5d335f6163b183f70a2eaed01",
    "poet.tang.31000.json": "f1efaf172d4f6fa9aaacfa4160feb766189989c3264da6ce3a6d64a7c97097bb",
    "poet.tang.32000.json": "fcb2096245719199249ad23e75eac6997b5a4341564dd1cf73ce8008975b3d74",
    "poet.tang.33000.json": "35abb37f65817ee4630cfeb2db286832e505873c477e12f14693bcd20e920885",
    "poet.tang.34000.json": "4b656a62b6a187792c96a632c7e33f443eabda8b48c4fb5dfdda72cf02003095",
    "poet.tang.35000.json": "a9671b350e58b805fda88b2c17fa0bf3a05313017d28485010e6f60a69bdf945",
    "poet.tang.36000.json": "1c8e71a32743b37d318bf8beb44b8809a8079011231cf3c7106e2c59f03c55b4",
    "poet.tang.37000.json": "4c37d2d92ee6fdd73299ef13c91e17b9cbb11ef59d1e024254db1eceb95dc7ae",
    "poet.tang.38000.json": "08b2ce85e59eac59fe621921b62c15528e9dfb6a102994297703ad67e14aa83f",
    "poet.tang.39000.json": "791d0171fe1dc88cee8424ae0281f495ed0dcdf042f97f2a3fc9b37e05e9426c",
    "poet.tang.40000.json": "851d0c3cb796c7f7c63a7765e28564b2c3be3d9691c9f43f88d4d3c64034b5d8",
    "poet.tang.41000.json": "3c12f59a5103e582eed9fe6ae13affddc030a31e9956efb13cb7768296ba7396",
    "poet.tang.42000.json": "060026beb06028864bce48e8074e2690f92a1dc5a76ee91f98f2d62b5f02a15c",
    "poet.tang.43000.json": "de5e658dccbcf0d2b38312b39a2423459b88ef893830bc145d453d82887a5753",
    "poet.tang.44000.json": "8c6d550818f5390413bc58fbb3af059d3fa4a92264b1bcf84439c2b0bb043985",
    "poet.tang.45000.json": "5177a4747b785f04897c36b77d5e033b11a7bcad759d1557fdb425166b8767f3",
    "poet.tang.46000.json": "287e548147e6959306b74c862a1ebe43cdca39adee34e2c63ae5d3b5eaced1f5",
    "poet.tang.47000.json": "8b43cce475ed43b1105a12a8bdcef32ac22dc056c5f2c616a2976a4103b5d8ac",
    "poet.tang.48000.json": "8df4861e8d7bc114e91d0a5e37d193f662485cd88b8d09289cc5ac9ab243c3ed",
    "poet.tang.49000.json": "418e5a082cb70c4f85ce842affec8828a53f6296882e45339c74d553fc46495e",
    "poet.tang.50000.json": "894bf4e729932d2b48ba731a48075347cf55626c08ac9f30b2fe412ca9e4e895",
    "poet.tang.51000.json": "9bd1b263807c5c64bca773b76d4861a49af19b76184f88260d6080bb03311928",
    "poet.tang.52000.json": "1124f4b27f46bd1ffaafdda530719eddbe41858778a0a13e4557ea4eb49ffef0",
    "poet.tang.53000.json": "75841062fa939e72ee12669859933c9178b88a5c5492bc9ba84d9ef7c6f1e65a",
    "poet.tang.54000.json": "cd2ba326b80ff8490723ad9fb1ace812306f0e433b74268420165068b0a975ac",
    "poet.tang.55000.json": "3782736dfee847958363d4adeff1236f148aff3726f2964963b17b06dad2f97b",
    "poet.tang.56000.json": "274ad6e13c069e35856e53b5dee6821ad2aa9bf8b2a5f969e2eb1234fe954bca",
    "poet.tang.57000.json": "e04c137b040c1a91e16614178c189d0c30a68e1d4657ea8fde8467601e3ac121",
}

# -----------------------------------------------------------------------------
# helpers


class DownloadError(UserError):
    """A download that failed; the message is one line a user can act on."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _one_line(reason: object) -> str:
    # error reasons come from the OS or the server; squash them so our message stays one line
    return " ".join(str(reason).split())


def _no_network(name: str, url: str, reason: object) -> str:
    return (f"could not download {name} from {url} ({_one_line(reason)}); with no network, "
            f"point --poems at a local copy of the corpus, e.g. "
            f"--poems ../shared/corpus/quan-tang-shi")


def _fetch(url: str, part: Path, timeout: float, bar: tqdm) -> None:
    """Append the rest of `url` to `part`, resuming from its current size if it exists."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "poems-download/1.0"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        resp = urlopen(Request(url, headers=headers), timeout=timeout)
    except HTTPError as e:
        if e.code == 416 and offset:
            # 416 Range Not Satisfiable: the .part is already as long as the file (or
            # longer), so it is no prefix we can extend; throw it away and start over
            part.unlink()
            return _fetch(url, part, timeout, bar)
        raise
    with resp:
        # only a 206 Partial Content continues where we left off; a server may ignore
        # Range and answer 200 with the whole file, and appending that would duplicate
        # the first `offset` bytes, so then we rewrite the .part from zero
        resumed = offset > 0 and resp.status == 206
        with open(part, "ab" if resumed else "wb") as f:
            for chunk in iter(lambda: resp.read(1 << 16), b""):
                f.write(chunk)
                bar.update(len(chunk))


# -----------------------------------------------------------------------------
# public API


def verify_corpus(dest: str | Path) -> list[str]:
    """Return the names in FILE_NAMES whose file in `dest` is missing or has the wrong sha256."""
    dest = Path(dest)
    return [name for name in FILE_NAMES
            if not (dest / name).is_file() or _sha256(dest / name) != SHA256[name]]


def download_corpus(
    dest: str | Path,
    base_url: str | None = None,
    names: list[str] | None = None,
    timeout: float = 30.0,
) -> list[Path]:
    """
    Make sure every file in `names` (default: all of FILE_NAMES) is in `dest` with its
    pinned sha256, downloading the ones that are missing. Returns the final paths.

    Each download goes to NAME.part, which a later call resumes (HTTP Range) if this one
    is interrupted, and becomes NAME (atomically, os.replace) only once its hash matches:
    so a file called NAME is always the right bytes. Raises DownloadError on failure.
    """
    dest = Path(dest)
    if base_url is None:
        # an env var lets CI or a mirror redirect downloads without touching the code
        base_url = os.environ.get("POEMS_BASE_URL") or BASE_URL
    base_url = base_url.rstrip("/") + "/"
    if urlsplit(base_url).scheme not in ("http", "https", "file"):
        # urlopen would raise a bare ValueError at the first file; say it before any work
        raise DownloadError(f"base URL {base_url!r} (--base-url or $POEMS_BASE_URL): not an http://, https:// or "
                            "file:// URL")
    names = list(FILE_NAMES if names is None else names)
    for name in names:
        if name not in SHA256:
            raise DownloadError(f"unknown corpus file {name!r}; the corpus is "
                                f"{FILE_NAMES[0]} ... {FILE_NAMES[-1]} in steps of 1000")
    if dest.exists() and not dest.is_dir():
        raise DownloadError(f"{dest} is a file, not a folder to download the corpus into")
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DownloadError(f"cannot make the folder {dest} ({e.strerror or e})") from None

    # first decide what is missing, so that a bad file already in dest stops us before
    # any download, and a complete corpus costs only hashing (no network at all)
    todo = []
    for name in names:
        path = dest / name
        if not path.exists():
            todo.append(name)
            continue
        if not path.is_file():
            raise DownloadError(f"{path} is a folder (or other non-file) where the corpus file goes; move it away")
        got, expected = _sha256(path), SHA256[name]
        if got != expected:
            # never overwrite a user's file: it might be an edited copy they care about
            raise DownloadError(f"{path} exists but its sha256 is {got[:12]}..., expected "
                                f"{expected[:12]}...; delete it to re-download it")

    # one bar over bytes for the whole run (the sizes are not known up front);
    # disable=None hides it when stderr is not a terminal, keeping logs clean
    with tqdm(desc="downloading Tang poems", unit="B", unit_scale=True, unit_divisor=1024,
              disable=None if todo else True) as bar:
        for name in todo:
            path, part, url = dest / name, dest / (name + ".part"), base_url + quote(name)
            expected = SHA256[name]
            bar.set_postfix_str(name)
            # an earlier run may have finished the download but died before the rename
            if not (part.exists() and _sha256(part) == expected):
                try:
                    _fetch(url, part, timeout, bar)
                except HTTPError as e:
                    raise DownloadError(_no_network(name, url, f"HTTP {e.code} {e.reason}")) from e
                except URLError as e:
                    raise DownloadError(_no_network(name, url, e.reason)) from e
                except (TimeoutError, ConnectionError, http.client.HTTPException) as e:
                    # raised while reading the body; the .part is kept, so a rerun resumes
                    raise DownloadError(_no_network(name, url, str(e) or type(e).__name__)) from e
                except ValueError as e:  # a URL urlopen cannot parse, such as http://[bad
                    raise DownloadError(f"cannot download {name} from {url}: {_one_line(e)}") from e
                except OSError as e:  # writing the .part: a full disk, a folder made read-only; a rerun resumes
                    raise DownloadError(f"cannot write {part} ({e.strerror or e}); free some space (or fix "
                                        "the folder's permissions) and run again: the download resumes") from e
            got = _sha256(part)
            if got != expected:
                # the bytes are wrong (a bad mirror, or a stale .part we resumed from);
                # keep nothing, so the next run starts clean
                part.unlink()
                raise DownloadError(f"{name} downloaded from {url} has sha256 {got[:12]}..., "
                                    f"expected {expected[:12]}...; deleted it, try again or "
                                    f"use --poems with a local copy of the corpus")
            os.replace(part, path)
    return [dest / name for name in names]
