"""clickrelay: a click-tracking SMTP relay with a redirect service and click reports."""

__version__ = "0.1.0"
