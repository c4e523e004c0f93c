# Source on the GPU machine from the repository root: makes `import pallax.<component>` work
# without building the package (the image has jax, flax, numpy; nothing can be installed from a
# registry there). Links the top-level folders into a throwaway `pallax` package on PYTHONPATH.
_root=$(pwd)
rm -rf /tmp/pallax_site && mkdir -p /tmp/pallax_site/pallax
for f in "$_root"/pallax/*; do ln -s "$f" /tmp/pallax_site/pallax/; done
for d in model kernels_pallas sharding decode finetune rpc bench; do
  ln -s "$_root/$d" /tmp/pallax_site/pallax/$d
done
export PYTHONPATH=/tmp/pallax_site${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
