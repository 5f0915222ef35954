import Foundation

/// `.status/metrics.prom`: the image's and the job's figures in Prometheus' text format
/// (node_exporter's textfile collector reads it as is). Every figure is one gauge or
/// counter; job figures carry the job's `device` label, image figures an `image` label.
public enum JobMetrics {
    /// Every sample carries `mountpoint` too: files of several mounts collected together
    /// (two mounts may serve images of one name) never repeat a series.
    public static func text(mountpoint: String, image: String, imageSize: UInt64, writesServed: Int, serving: String,
                            job: BlockJobInfo?) -> String {
        var out = ""
        func metric(_ name: String, _ type: String, _ help: String, _ samples: [(labels: [(String, String)], value: Double)]) {
            out += "# HELP \(name) \(help)\n# TYPE \(name) \(type)\n"
            for sample in samples {
                let labels = ([("mountpoint", mountpoint)] + sample.labels).map { "\($0.0)=\"\(escape($0.1))\"" }.joined(separator: ",")
                out += "\(name){\(labels)} \(format(sample.value))\n"
            }
        }
        let imageLabel = [("image", image)]
        metric("mirrorfs_image_size_bytes", "gauge", "Size of the image the mount serves.",
               [(imageLabel, Double(imageSize))])
        metric("mirrorfs_image_writes_total", "counter", "Writes and hole punches the mount has served.",
               [(imageLabel, Double(writesServed))])
        metric("mirrorfs_image_serving_info", "gauge", "The file or NBD export the image is served from (always 1).",
               [(imageLabel + [("serving", serving)], 1)])
        metric("mirrorfs_job_active", "gauge", "Whether a mirror job exists on the image.",
               [(imageLabel, job == nil ? 0 : 1)])
        guard let job else { return out }
        let device = [("device", job.device)]
        func gauge(_ name: String, _ help: String, _ value: Double) {
            metric("mirrorfs_job_" + name, "gauge", help, [(device, value)])
        }
        func flag(_ value: Bool) -> Double { value ? 1 : 0 }
        gauge("len_bytes", "Bytes the job's progress is measured against (query-block-jobs len).", Double(job.len))
        gauge("offset_bytes", "Bytes copied so far (query-block-jobs offset).", Double(job.offset))
        gauge("remaining_bytes", "Bytes still to copy (len - offset).", Double(job.len > job.offset ? job.len - job.offset : 0))
        gauge("dirty_bytes", "Bytes marked dirty and not yet copied.", Double(job.dirtyBytes))
        gauge("speed_limit_bytes_per_second", "Background copy limit (0: none).", Double(job.speed))
        gauge("elapsed_seconds", "Seconds since the job started.", job.elapsedSeconds)
        gauge("dirty_rate_bytes_per_second", "User writes that dirtied clean regions, over the last 10 s.", job.forecast.dirtyRate.rounded())
        gauge("copy_rate_bytes_per_second", "Bytes written to the target, over the last 10 s.", job.forecast.copyRate.rounded())
        gauge("converging", "Whether the copy gains on the writes (what is left shrinks).", flag(job.forecast.converging))
        // No sample while not converging: there is no time to forecast.
        if let eta = job.forecast.etaSeconds {
            gauge("eta_seconds", "Forecast seconds until nothing is left to copy.", (eta * 10).rounded() / 10)
        }
        gauge("ready", "Whether the job is ready (source and target converged).", flag(job.ready))
        gauge("actively_synced", "Whether every write reaches the target before it is acknowledged.", flag(job.activelySynced))
        gauge("paused", "Whether the job is paused.", flag(job.paused))
        gauge("io_error", "Whether the job's io-status is not ok.", flag(job.ioStatus != .ok))
        metric("mirrorfs_job_status", "gauge", "The job's status (1 for the current one).",
               JobStatus.allCases.map { (device + [("status", $0.rawValue)], flag($0 == job.status)) })
        metric("mirrorfs_job_copy_mode", "gauge", "The job's copy mode (1 for the current one).",
               CopyMode.allCases.map { (device + [("mode", $0.rawValue)], flag($0 == job.copyMode)) })
        return out
    }

    /// Label values escape backslash, double quote and newline.
    static func escape(_ value: String) -> String {
        value.replacingOccurrences(of: "\\", with: "\\\\").replacingOccurrences(of: "\"", with: "\\\"")
            .replacingOccurrences(of: "\n", with: "\\n")
    }

    static func format(_ value: Double) -> String {
        value == value.rounded() && abs(value) < 1e15 ? String(Int64(value)) : String(value)
    }
}
