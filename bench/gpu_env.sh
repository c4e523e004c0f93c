# Source on the GPU machine from the repository root: makes `import pallax.<component>` work
# without building the package (the image has jax, flax, numpy; nothing can be installed from a
# registry there). Links the top-level folders into a throwaway `pallax` package on PYTHONPATH,
# then moves to /tmp so `python3 -m pallax...` does not pick up the checkout's own `pallax/`
# folder; $PALLAX_REPO is the checkout.
_root=$(pwd)
rm -rf /tmp/pallax_site && mkdir -p /tmp/pallax_site/pallax
for f in "$_root"/pallax/*; do ln -s "$f" /tmp/pallax_site/pallax/; done
for d in model kernels_pallas sharding decode finetune rpc bench; do
  ln -s "$_root/$d" /tmp/pallax_site/pallax/$d
done
export PYTHONPATH=/tmp/pallax_site${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
export PALLAX_REPO="$_root"
cd /tmp
