# The demo's world and the recipe of its shipped base policy and labeler (script/demo/assets/world_seed0), sourced by
# script/demo/world_cpu.sh and script/demo/make_assets.sh. build_base.sh's defaults plus these flags (later flags win).
# The test split is larger than build_base.sh's 300 scenes: a 50 % change on 300 scenes moved by 7 points between
# the demo's 300 and 1000 scenes of the same world (README); the base and labeler do not depend on it.
DEMO_SEED=0
DEMO_BUILD_ARGS="--n-test 1000"
DEMO_BOOTSTRAP_ARGS="--steps 8000"
DEMO_LABELER_ARGS="--own-steps 1000 --own-scenes 2000"
