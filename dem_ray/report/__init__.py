"""The run report: built from the manifest and the scores, rendered as JSON, Markdown, HTML."""
