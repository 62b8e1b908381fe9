set -x
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader
make -s build/bench >/dev/null 2>&1 || make build/bench
./build/bench --row 8,32768,128 --sparsity 0.7 2>&1 | tail -3
S="--section SpeedOfLight --section WarpStateStats --section ComputeWorkloadAnalysis --section InstructionStats --section Occupancy --section LaunchStats"
M="--metrics l1tex__data_pipe_lsu_wavefronts_mem_shared.sum,l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum,l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ld.sum,smsp__inst_executed.sum,sm__cycles_elapsed.avg,smsp__inst_executed_op_shared_ld.sum,l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_st.sum"
timeout 200 ncu --clock-control none -k regex:mustafar_attention -s 20 -c 1 $S $M ./build/bench --row 8,32768,128 --sparsity 0.7 > $OUT/ncu_attn.txt 2>&1
timeout 200 ncu --clock-control none -k regex:mustafar_append -s 3 -c 1 $S $M ./build/bench --row 8,32768,128 --sparsity 0.7 > $OUT/ncu_append.txt 2>&1
grep -E "Duration|Executed Ipc A|Issue Slots Busy|Warp Cycles Per Issued|Stall|wavefronts|bank_conflicts|inst_executed|cycles_elapsed|Achieved Occupancy|Registers|Theoretical Occ|Memory Throughput|DRAM Throughput|L1/TEX Hit|Compute \(SM\)" $OUT/ncu_attn.txt | head -60
echo =====APPEND
grep -E "Duration|Executed Ipc A|Issue Slots Busy|Warp Cycles Per Issued|wavefronts|bank_conflicts|inst_executed|Achieved Occupancy|Registers|DRAM Throughput|Compute \(SM\)" $OUT/ncu_append.txt | head -30
