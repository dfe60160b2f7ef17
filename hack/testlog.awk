# Reads `go test -v` output: prints the progress lines as they come, and at
# the end the whole output of every failed test (its logs, the log tails in
# its failure message), which the progress filter hides. CI shows only what
# this prints, so a failure must explain itself here.
#   go test -v ... 2>&1 | tee x.log | awk -v extra='system.go' -f hack/testlog.awk
BEGIN { keep = 400; pattern = "^(=== RUN|--- |PASS|FAIL|ok|panic|[[:space:]]+[^[:space:]]+_test\\.go" (extra != "" ? "|[[:space:]]+" extra : "") ")" }
{
	if ($0 ~ pattern) { print; fflush() }
	if ($0 ~ /^=== RUN   [^\/]+$/) { n = 0 }
	buf[n++ % keep] = $0
	if ($0 ~ /^--- FAIL: / || $0 ~ /^panic: /) {
		start = n > keep ? n - keep : 0
		failed = failed "\n######## full output (last " keep " lines) up to: " $0 "\n"
		for (i = start; i < n; i++) failed = failed buf[i % keep] "\n"
		n = 0
	}
}
END { if (failed != "") printf "%s", failed }
