"""A capsule's README as safe HTML for the web page.

Rendered on the server with markdown-it-py (CommonMark, plus GitHub's tables and strikethrough),
then sanitised with nh3 (the ammonia allowlist: no scripts, no event handlers, no ``javascript:``
URLs, links get ``rel="noopener noreferrer"``). Raw HTML in the Markdown is allowed through the
renderer and then cut down by the sanitiser, as GitHub does, so ``<details>`` or ``<img>`` in a
README survive while ``<script>`` does not. The page inserts only this output as HTML.
"""

from __future__ import annotations

from functools import lru_cache

import nh3
from markdown_it import MarkdownIt

_MD = MarkdownIt("commonmark", {"html": True, "linkify": False}).enable(["table", "strikethrough"])
# ammonia's defaults plus what Markdown output needs to keep its meaning.
_TAGS = nh3.ALLOWED_TAGS | {"details", "summary"}
_ATTRIBUTES = {**nh3.ALLOWED_ATTRIBUTES, "code": {"class"}, "th": {"align", "style"}, "td": {"align", "style"}}
_SCHEMES = {"http", "https", "mailto"}


@lru_cache(maxsize=256)
def render_readme(markdown: str) -> str:
    """Sanitised HTML for a README's Markdown (cached: the same text renders to the same bytes)."""
    html = _MD.render(markdown)
    return nh3.clean(html, tags=_TAGS, attributes=_ATTRIBUTES, url_schemes=_SCHEMES,
                     filter_style_properties={"text-align"}, link_rel="noopener noreferrer")
