"""HTML report of a scan: one self-contained page (inline CSS, embedded PNG figures, no scripts).

Needs the ``report`` extra (``pip install 'influencer[report]'``: jinja2, matplotlib, powerlaw), imported on first use.
"""

from influencer.report.html import render_report, write_report

__all__ = ["render_report", "write_report"]
