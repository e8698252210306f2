"""Running a federation: the RunSpec handed to the ServerApp (`spec`), the one Flower launcher (`launch`) and its
patches (`app_by_name`, `linkstate_index`), the guarded grid (`grid`), the deployment runtime (`deployment`), run
dirs and resume (`rundir`), and the reaper of orphaned processes (`reaper`)."""
