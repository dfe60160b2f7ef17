package workload

import "testing"

func TestParseSpecs(t *testing.T) {
	got, err := ParseSpecs("10MB/1, 1GB/4,512KB/2")
	if err != nil {
		t.Fatal(err)
	}
	want := []Spec{{"10MB-1layer", 10_000_000, 1}, {"1GB-4layer", 1_000_000_000, 4}, {"512KB-2layer", 512_000, 2}}
	if len(got) != len(want) {
		t.Fatalf("got %v", got)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("got %+v, want %+v", got[i], want[i])
		}
	}
	for _, bad := range []string{"10MB", "10XB/1", "10MB/0", "3/4", ""} {
		if _, err := ParseSpecs(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}
