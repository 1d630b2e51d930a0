"""Running a build: the unit worker, shards, executors, isolation, the build itself.

unit.py     ``process_unit``: read → labels → cut → labels-route regions → captions (when no
            model stage follows) for one unit, in an isolated worker
shards.py   unit results → table rows (model stage and its captions here) → commit
attach.py   annotation tables and reports joined to the units (on the driver, by keys)
execute.py  executors: local (forked workers) and Ray Data (actor pools)
isolate.py  forked children under a timeout and an address-space cap
scan.py     the header scan for both executors (forked batches; Ray tasks under Ray)
progress.py live bars on a terminal, plain lines elsewhere (tqdm)
build.py    ``build(BuildConfig)``: discovery (file index: only new or changed files scanned),
            resume, execution, manifest
"""
