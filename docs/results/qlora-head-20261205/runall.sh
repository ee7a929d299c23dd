set -x
for bin in base new; do
  b=/tmp/sage-base; [ $bin = new ] && b=/work/main/target/release/sage
  cp $b /tmp/sage-$bin-copy
  /usr/bin/time -v /tmp/sage-$bin-copy sfe --config sfe-quantized.toml --out run-lite-$bin > stdout-lite-$bin.txt 2> stderr-lite-$bin.txt
  /usr/bin/time -v /tmp/sage-$bin-copy sfe --config sfe-qwen-quantized.toml --out run-qwen-$bin > stdout-qwen-$bin.txt 2> stderr-qwen-$bin.txt
done
echo done
