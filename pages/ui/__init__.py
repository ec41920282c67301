"""Helpers shared by the pages: :mod:`.state` (session state and URL), :mod:`.runs` (opening, training
and computing with progress), :mod:`.widgets` (picker, errors, tables, image grids) and :mod:`.charts`."""
