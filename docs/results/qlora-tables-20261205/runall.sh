set -x
for bin in base new; do
  cp /tmp/sage-$bin /tmp/qtab/sage-$bin-copy
  /usr/bin/time -v /tmp/qtab/sage-$bin-copy sfe --config sfe-qwen-quantized.toml --out run-qwen-$bin > stdout-qwen-$bin.txt 2> stderr-qwen-$bin.txt
  /usr/bin/time -v /tmp/qtab/sage-$bin-copy sfe --config sfe-quantized.toml --out run-lite-$bin > stdout-lite-$bin.txt 2> stderr-lite-$bin.txt
done
echo done
