"""What every static page of f2d-bench shares: number formatting, the jinja2 environment, the hash that lets
one inline script or style through a page's Content-Security-Policy, and the check that every link of a
page stays inside its folder.

Pages open from disk with no network: their CSP (``default-src 'none'``) allows only what is named in it,
so an inline ``<script>`` or ``<style>`` runs only if its sha256 is listed, and nothing is fetched from
elsewhere.
"""

from __future__ import annotations

import base64
import hashlib
import math
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

from f2d_bench.errors import F2DBenchError
from f2d_bench.report.thumbnails import inside

TEMPLATES = Path(__file__).parent / "templates"
LINK_ATTRIBUTES = ("href", "src", "srcset", "poster", "data", "action", "formaction", "xlink:href", "background")


def finite(value) -> bool:
    """Whether ``value`` is a finite number (None, NaN, text: False)."""
    try:
        return value is not None and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def fmt(value, digits: int = 4) -> str:
    """A number as the page shows it (``–`` for a missing value)."""
    return f"{float(value):.{digits}f}" if finite(value) else "\u2013"


def inline_hash(text: str) -> str:
    """The base64 sha256 of an inline script or style, as a CSP ``'sha256-…'`` source names it."""
    return base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii")


def environment():
    """The jinja2 environment of the templates in ``templates/``: every value autoescaped."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        autoescape=True,  # every template and every value: user text never becomes markup
        undefined=jinja2.StrictUndefined,
        trim_blocks=True, lstrip_blocks=True,
    )
    env.filters["fmt"] = fmt
    return env


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.links: list[tuple[str, str, str]] = []

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if name in LINK_ATTRIBUTES and value is not None:
                self.links.append((tag, name, value))

    handle_startendtag = handle_starttag


def page_links(html: str) -> list[tuple[str, str, str]]:
    """(tag, attribute, value) of every link-like attribute in ``html``."""
    parser = _Links()
    parser.feed(html)
    parser.close()
    return parser.links


def check_links_inside(html: str, out_dir: Path, *, also: frozenset[str] = frozenset()) -> None:
    """Raise unless every href/src of ``html`` is a relative link to an existing file inside ``out_dir``.

    Fragment-only links (``#table1``) are allowed, and so are the exact ``also`` hrefs (a report's link up
    to its folder's index); schemes (http:, file:, javascript:, data:), absolute paths and links that
    leave the folder are not.
    """
    root = out_dir.resolve()
    for tag, attr, value in page_links(html):
        values = [v.strip().split(" ")[0] for v in value.split(",")] if attr == "srcset" else [value]
        for v in values:
            if (v.startswith("#") or v in also) and attr == "href":
                continue
            parts = urlsplit(v)
            if parts.scheme or parts.netloc or v.startswith(("/", "\\")) or not parts.path:
                raise F2DBenchError(f"page link <{tag} {attr}={v!r}> is not relative to the page's folder")
            target = (root / unquote(parts.path)).resolve()
            if not inside(target, root) or not target.is_file():
                raise F2DBenchError(f"page link <{tag} {attr}={v!r}> does not resolve to a file inside {root}")


def model_text(method: dict) -> str:
    """A method's base model as one line: ``pretrained@revision (dtype)``, or where external images came from."""
    model = method.get("model")
    if isinstance(model, dict) and model.get("pretrained"):
        text = str(model["pretrained"])
        if model.get("revision"):
            text += f"@{model['revision']}"
        return text + (f" ({model['dtype']})" if model.get("dtype") else "")
    if method.get("source"):
        return "external images"
    return "\u2013"


def sampling_text(method: dict) -> str:
    """A method's sampling as one line: ``EulerAncestral, 30 steps, CFG 7, 512x512``."""
    s = method.get("sampling")
    if not isinstance(s, dict) or not s:
        return "\u2013"
    parts = []
    if s.get("scheduler"):
        parts.append(str(s["scheduler"]).replace("DiscreteScheduler", "").replace("Scheduler", ""))
    if s.get("num_inference_steps") is not None:
        parts.append(f"{s['num_inference_steps']} steps")
    if s.get("guidance_scale") is not None:
        parts.append(f"CFG {s['guidance_scale']}")
    if s.get("width") is not None and s.get("height") is not None:
        parts.append(f"{s['width']}x{s['height']}")
    return ", ".join(parts) or "\u2013"


def setup_text(method: dict) -> str:
    """A method's base model and sampling as the line shown under its name in every table:
    ``CompVis/stable-diffusion-v1-4 (float16) | protocol sampling: EulerAncestral, 30 steps, CFG 7.0, 512x512``.
    ``method``: ``model``, ``sampling``, ``sampling_mode`` and ``replaces`` as method.json records them."""
    if not method.get("model") and not method.get("sampling"):
        return model_text(method) if method.get("source") else ""
    text = model_text(method)
    if method.get("replaces"):
        text += " with its own " + ", ".join(map(str, method["replaces"]))
    mode = method.get("sampling_mode") or "protocol"
    return f"{text} | {mode} sampling: {sampling_text(method)}"
