"""Pictures of probe results: the /ui dashboard and `entropy-probe report` share this package
(views → dashboard → plotly figures → one page, linked or self-contained)."""
