"""JavaScript probes of the page's layout, for the browser tests (run with ``Browser.evaluate``)."""

from __future__ import annotations


def wrapped_values(selector: str) -> str:
    """An expression listing the text of every element matching ``selector`` whose text is laid out on more
    than one line (a Range over the text gives one client rect per line box it spans)."""
    return f"""Array.from(document.querySelectorAll({selector!r})).filter(el => {{
        if (!el.textContent.trim() || !el.getClientRects().length) return false;
        const range = document.createRange();
        range.selectNodeContents(el);
        const tops = new Set(Array.from(range.getClientRects()).filter(r => r.width > 0)
                                  .map(r => Math.round(r.top)));
        return tops.size > 1;
    }}).map(el => el.textContent)"""


#: The page is no wider than the window (a table too wide scrolls inside its own box, sideways only).
PAGE_OVERFLOW = "document.documentElement.scrollWidth - window.innerWidth"

#: The plans table's box shows every row of the page it holds: no inner vertical scrolling.
PLANS_BOX_SCROLLS = ("(() => { const w = document.querySelector('#plans').parentElement;"
                     " return w.scrollHeight - w.clientHeight; })()")
