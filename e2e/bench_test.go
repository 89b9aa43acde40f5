package e2e

import (
	"io"
	"net/http"
	"testing"
)

// BenchmarkSmallGET is the in-process twin of make bench's small-GET
// workload, for profiling: go test -run '^$' -bench SmallGET -cpuprofile cpu.out ./e2e
func BenchmarkSmallGET(b *testing.B) {
	e := newEnv(b)
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 64}}
	defer client.CloseIdleConnections()
	url := e.scannerBase + "/rest/api/1.0/application-properties"
	b.SetParallelism(8)
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			req, _ := http.NewRequest("GET", url, nil)
			req.Header.Set("Authorization", "Bearer "+scannerToken)
			resp, err := client.Do(req)
			if err != nil {
				b.Error(err)
				return
			}
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
		}
	})
}

// BenchmarkSmallGETSerial is one client, one request at a time: latency.
func BenchmarkSmallGETSerial(b *testing.B) {
	e := newEnv(b)
	client := &http.Client{Transport: &http.Transport{}}
	defer client.CloseIdleConnections()
	url := e.scannerBase + "/rest/api/1.0/application-properties"
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		req, _ := http.NewRequest("GET", url, nil)
		req.Header.Set("Authorization", "Bearer "+scannerToken)
		resp, err := client.Do(req)
		if err != nil {
			b.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}
}
